"""UNet2DConditionModel weights: diffusers checkpoints <-> jdistill parameters.

The module tree mirrors diffusers' names, so the generic rules of ``convert.core`` cover every key.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Unpack

import numpy as np

from jdistill.convert.core import load_state_dict, to_state_dict
from jdistill.convert.loader import LoadOptions, load_component, takes_load_options
from jdistill.models.net import Net
from jdistill.models.unet import UNetConfig, unet_net

PyTree = Any


@takes_load_options()
def load_unet(
    source: str | Mapping[str, Any], config: UNetConfig | None = None, **options: Unpack[LoadOptions]
) -> tuple[Net, PyTree]:
    """(Net, params) from a ``unet/`` folder (config.json + safetensors) or an in-memory state dict."""
    convert = partial(load_state_dict, what="UNet2DConditionModel")
    return load_component(source, config, UNetConfig, unet_net, options, convert)


def unet_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    return to_state_dict(params)
