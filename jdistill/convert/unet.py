"""UNet2DConditionModel weights: diffusers checkpoints <-> jdistill parameters.

The module tree mirrors diffusers' names, so the generic rules of ``convert.core`` cover every key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jdistill.convert.core import load_state_dict, to_state_dict
from jdistill.convert.io import component_source
from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net
from jdistill.models.unet import UNetConfig, unet_net

PyTree = Any


def load_unet(
    source: str | Mapping[str, Any],
    config: UNetConfig | None = None,
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool = False,
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
) -> tuple[Net, PyTree]:
    """(Net, params) from a ``unet/`` folder (config.json + safetensors) or an in-memory state dict."""
    config, state = component_source(source, config, UNetConfig, variant, allow_pickle)
    net = unet_net(config, precision=precision, attention_impl=attention_impl, remat=remat)
    return net, load_state_dict(net.abstract, state, place=place, what="UNet2DConditionModel")


def unet_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    return to_state_dict(params)
