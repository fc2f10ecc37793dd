"""What every component loader (``load_unet``, ``load_vae``, ``load_t5``, ...) shares: its keyword options and
the way from a component folder or an in-memory state dict to a built ``Net`` and its converted parameters.

A loader is declared once as ``load_x(source, config=None, **options: Unpack[LoadOptions])`` under
``@takes_load_options()``; the decorator gives it the options as real keyword-only parameters with their
defaults, so callers, ``help`` and ``inspect.signature`` (``convert.pipeline`` passes a loader only the options
it takes) see the same function as if each loader spelt the options out.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

import numpy as np

from jdistill.convert.io import component_source
from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net

PyTree = Any
Place = Callable[[tuple[str, ...], np.ndarray], Any]


class BaseLoadOptions(TypedDict, total=False):
    """The keyword options of every component loader (defaults in ``DEFAULTS``)."""

    variant: str | None  # the weight files' variant, e.g. "fp16"
    allow_pickle: bool  # read pickle checkpoints (they can run code) where no safetensors are
    precision: Precision
    remat: bool | str
    place: Place | None  # puts each converted array where it belongs (default: a host numpy array)


class LoadOptions(BaseLoadOptions, total=False):
    """The options of the loaders whose model has a choice of attention kernel (all but T5)."""

    attention_impl: str


# In the order the loaders list them.
DEFAULTS: dict[str, Any] = {
    "variant": None,
    "allow_pickle": False,
    "precision": FP32,
    "attention_impl": "xla",
    "remat": False,
    "place": None,
}
# The options that shape the model rather than the reading.
NET_OPTIONS = ("precision", "attention_impl", "remat")


def takes_load_options(schema: type = LoadOptions) -> Callable[[Callable], Callable]:
    """Decorate a loader declared ``f(source, config=None, *, [own keywords], **options: Unpack[schema])``: its
    signature lists ``schema``'s options as keyword-only parameters with their defaults, an unknown keyword is
    a ``TypeError`` as for any function, and ``options`` arrives with every default filled in."""
    hints = typing.get_type_hints(schema)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[name])
        for name, default in DEFAULTS.items()
        if name in hints
    ]

    def decorate(fn: Callable) -> Callable:
        declared = inspect.signature(fn)
        own = [p for p in declared.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        signature = declared.replace(parameters=own + extra)

        @functools.wraps(fn)
        def loader(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{fn.__name__}() {err}") from None
            bound.apply_defaults()
            return fn(*bound.args, **bound.kwargs)

        loader.__signature__ = signature
        return loader

    return decorate


def build_net(make_net: Callable[..., Net], config: Any, options: BaseLoadOptions, **fixed: Any) -> Net:
    """``make_net(config, **fixed)`` with the options that shape the model (those of ``NET_OPTIONS`` given)."""
    return make_net(config, **fixed, **{k: options[k] for k in NET_OPTIONS if k in options})


def load_component(
    source: str | Mapping[str, Any],
    config: Any,
    config_cls: type,
    make_net: Callable[..., Net],
    options: BaseLoadOptions,
    convert: Callable[..., PyTree],
) -> tuple[Net, PyTree]:
    """(Net, params) of one component: its config and lazy state dict from a folder (config.json + weights) or
    an in-memory state dict (which needs ``config``), its Net built by ``make_net`` with the options, and its
    parameters from ``convert(abstract, state, place=...)`` (e.g. ``partial(core.load_state_dict, what=...)``,
    which refuses missing, unexpected and mis-shaped keys)."""
    config, state = component_source(source, config, config_cls, options["variant"], options["allow_pickle"])
    net = build_net(make_net, config, options)
    return net, convert(net.abstract, state, place=options["place"])
