"""CLIP text encoder weights: transformers checkpoints <-> jdistill parameters.

Two key layouts exist for the same tensors: the hub's (``text_model.encoder.layers.0...``, what pipelines on the
hub ship and what ``CLIPTextModelWithProjection`` saves) and the unprefixed one transformers 5 saves for
``CLIPTextModel`` (``encoder.layers.0...``). Both load; the ``position_ids`` buffer some checkpoints carry is
skipped. Beyond that the generic rules of ``convert.core`` cover every key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Unpack

import numpy as np

from jdistill.convert.core import load_state_dict, to_state_dict
from jdistill.convert.io import component_source
from jdistill.convert.loader import LoadOptions, build_net, takes_load_options
from jdistill.models.clip import CLIPTextConfig, clip_text_net
from jdistill.models.net import Net

PyTree = Any
PREFIX = "text_model."
PROJECTION = "text_projection."
IGNORE = (r"(^|\.)position_ids$",)


@dataclasses.dataclass(frozen=True)
class Tower:
    """What tells one CLIP tower (text or vision) from the other when loading it."""

    config_cls: type
    make_net: Callable[..., Net]  # (config, *, with_projection, precision, attention_impl, remat) -> Net
    prefix: str  # of every key in the hub layout
    projection: str  # prefix of the projection's keys
    names: tuple[str, str]  # the model's class names without / with projection, for messages


TEXT_TOWER = Tower(
    CLIPTextConfig, clip_text_net, PREFIX, PROJECTION, ("CLIPTextModel", "CLIPTextModelWithProjection")
)


def load_tower(
    tower: Tower,
    source: str | Mapping[str, Any],
    config: Any,
    with_projection: bool | None,
    options: LoadOptions,
) -> tuple[Net, PyTree]:
    """One CLIP tower from a folder or a state dict: the class follows the weights (with projection iff
    ``<projection>weight`` is there) unless ``with_projection`` is given; the hub layout (every key under
    ``prefix``) and the unprefixed one transformers 5 saves both load."""
    config, state = component_source(
        source, config, tower.config_cls, options["variant"], options["allow_pickle"]
    )
    if with_projection is None:
        with_projection = tower.projection + "weight" in state
    # One layout per checkpoint: if any key has the hub prefix, all must (others are reported unexpected).
    prefixed = any(k.startswith(tower.prefix) for k in state)

    def add_prefix(key: str) -> str:
        return key if key.startswith((tower.prefix, tower.projection)) else tower.prefix + key

    net = build_net(tower.make_net, config, options, with_projection=with_projection)
    params = load_state_dict(
        net.abstract,
        state,
        rename=None if prefixed else add_prefix,
        ignore=IGNORE,
        place=options["place"],
        what=tower.names[with_projection],
    )
    return net, params


@takes_load_options()
def load_clip_text(
    source: str | Mapping[str, Any],
    config: CLIPTextConfig | None = None,
    *,
    with_projection: bool | None = None,
    **options: Unpack[LoadOptions],
) -> tuple[Net, PyTree]:
    """(Net, params) from a ``text_encoder/`` folder (config.json + safetensors) or an in-memory state dict.

    ``with_projection=None`` takes the model class from the checkpoint: with projection iff it holds
    ``text_projection.weight``. Loading is strict (``ConversionError`` names missing, unexpected and mis-shaped
    keys).
    """
    return load_tower(TEXT_TOWER, source, config, with_projection, options)


def clip_state_dict(params: PyTree, prefix: bool = True) -> dict[str, np.ndarray]:
    """The torch state dict of CLIP text parameters: hub layout, or without ``text_model.`` (transformers 5's
    ``CLIPTextModel``) when ``prefix`` is False."""

    def strip(key: str) -> str:
        return key.removeprefix(PREFIX)

    return to_state_dict(params, rename=None if prefix else strip)
