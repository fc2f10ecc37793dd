"""CLIP text encoder weights: transformers checkpoints <-> jdistill parameters.

Two key layouts exist for the same tensors: the hub's (``text_model.encoder.layers.0...``, what pipelines on the
hub ship and what ``CLIPTextModelWithProjection`` saves) and the unprefixed one transformers 5 saves for
``CLIPTextModel`` (``encoder.layers.0...``). Both load; the ``position_ids`` buffer some checkpoints carry is
skipped. Beyond that the generic rules of ``convert.core`` cover every key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jdistill.convert.core import load_state_dict, to_state_dict
from jdistill.convert.io import component_source
from jdistill.models.clip import CLIPTextConfig, clip_text_net
from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net

PyTree = Any
PREFIX = "text_model."
PROJECTION = "text_projection."
IGNORE = (r"(^|\.)position_ids$",)


def load_tower(
    source: str | Mapping[str, Any],
    config: Any,
    config_cls: type,
    make_net: Callable[[Any, bool], Net],
    *,
    prefix: str,
    projection: str,
    names: tuple[str, str],
    with_projection: bool | None,
    variant: str | None,
    allow_pickle: bool,
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None,
) -> tuple[Net, PyTree]:
    """One CLIP tower (text or vision) from a folder or a state dict: the class follows the weights (with
    projection iff ``<projection>weight`` is there) unless ``with_projection`` is given; the hub layout (every
    key under ``prefix``) and the unprefixed one transformers 5 saves both load. ``names``: the model's class
    names without / with projection, for messages."""
    config, state = component_source(source, config, config_cls, variant, allow_pickle)
    if with_projection is None:
        with_projection = projection + "weight" in state
    # One layout per checkpoint: if any key has the hub prefix, all must (others are reported unexpected).
    prefixed = any(k.startswith(prefix) for k in state)

    def add_prefix(key: str) -> str:
        return key if key.startswith((prefix, projection)) else prefix + key

    net = make_net(config, with_projection)
    params = load_state_dict(
        net.abstract,
        state,
        rename=None if prefixed else add_prefix,
        ignore=IGNORE,
        place=place,
        what=names[with_projection],
    )
    return net, params


def load_clip_text(
    source: str | Mapping[str, Any],
    config: CLIPTextConfig | None = None,
    *,
    with_projection: bool | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool = False,
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
) -> tuple[Net, PyTree]:
    """(Net, params) from a ``text_encoder/`` folder (config.json + safetensors) or an in-memory state dict.

    ``with_projection=None`` takes the model class from the checkpoint: with projection iff it holds
    ``text_projection.weight``. Loading is strict (``ConversionError`` names missing, unexpected and mis-shaped
    keys).
    """
    return load_tower(
        source,
        config,
        CLIPTextConfig,
        lambda cfg, proj: clip_text_net(
            cfg, with_projection=proj, precision=precision, attention_impl=attention_impl, remat=remat
        ),
        prefix=PREFIX,
        projection=PROJECTION,
        names=("CLIPTextModel", "CLIPTextModelWithProjection"),
        with_projection=with_projection,
        variant=variant,
        allow_pickle=allow_pickle,
        place=place,
    )


def clip_state_dict(params: PyTree, prefix: bool = True) -> dict[str, np.ndarray]:
    """The torch state dict of CLIP text parameters: hub layout, or without ``text_model.`` (transformers 5's
    ``CLIPTextModel``) when ``prefix`` is False."""

    def strip(key: str) -> str:
        return key.removeprefix(PREFIX)

    return to_state_dict(params, rename=None if prefix else strip)
