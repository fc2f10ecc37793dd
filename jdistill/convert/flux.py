"""FluxTransformer2DModel weights: diffusers checkpoints <-> jdistill parameters.

The module tree mirrors diffusers' names, so the generic rules of ``convert.core`` cover every key (the scanned
stacks' per-layer keys included).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jdistill.convert.core import load_state_dict, to_state_dict
from jdistill.convert.io import component_source
from jdistill.models.flux import FluxConfig, flux_net
from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net

PyTree = Any


def load_flux(
    source: str | Mapping[str, Any],
    config: FluxConfig | None = None,
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool | str = False,
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
) -> tuple[Net, PyTree]:
    """(Net, params) from a ``transformer/`` folder (config.json + safetensors) or an in-memory state dict,
    which needs ``config``."""
    config, state = component_source(source, config, FluxConfig, variant, allow_pickle)
    net = flux_net(config, precision=precision, attention_impl=attention_impl, remat=remat)
    return net, load_state_dict(net.abstract, state, place=place, what="FluxTransformer2DModel")


def flux_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    """The diffusers state dict (numpy arrays, torch layouts) of FLUX transformer parameters."""
    return to_state_dict(params)
