"""FluxTransformer2DModel weights: diffusers checkpoints <-> jdistill parameters.

The module tree mirrors diffusers' names, so the generic rules of ``convert.core`` cover every key (the scanned
stacks' per-layer keys included).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Unpack

import numpy as np

from jdistill.convert.core import load_state_dict, to_state_dict
from jdistill.convert.loader import LoadOptions, load_component, takes_load_options
from jdistill.models.flux import FluxConfig, flux_net
from jdistill.models.net import Net

PyTree = Any


@takes_load_options()
def load_flux(
    source: str | Mapping[str, Any], config: FluxConfig | None = None, **options: Unpack[LoadOptions]
) -> tuple[Net, PyTree]:
    """(Net, params) from a ``transformer/`` folder (config.json + safetensors) or an in-memory state dict,
    which needs ``config``."""
    convert = partial(load_state_dict, what="FluxTransformer2DModel")
    return load_component(source, config, FluxConfig, flux_net, options, convert)


def flux_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    """The diffusers state dict (numpy arrays, torch layouts) of FLUX transformer parameters."""
    return to_state_dict(params)
