"""AutoencoderKL weights: diffusers checkpoints <-> jdistill parameters.

The module tree mirrors diffusers' names, so the generic rules of ``convert.core`` cover every key. Older
checkpoints (saved before diffusers renamed its AttentionBlock) name the mid-block attention
``query/key/value/proj_attn``; they are renamed on load as diffusers' ``_fix_state_dict_keys_on_load`` does,
and 1x1-conv shaped (C, C, 1, 1) projection weights of converted LDM checkpoints are squeezed to (C, C).
Saving always writes the current names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Unpack

import numpy as np

from jdistill.convert.core import ConversionError, load_state_dict, to_state_dict
from jdistill.convert.loader import LoadOptions, Place, load_component, takes_load_options
from jdistill.models.net import Net
from jdistill.models.vae import AutoencoderKLConfig, vae_net

PyTree = Any

_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$"
)
_PROJ_WEIGHT_RE = re.compile(
    r"\.mid_block\.attentions\.\d+\.(?:to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.weight$"
)


def rename_legacy(key: str) -> str:
    """The current diffusers name of a (possibly legacy) VAE checkpoint key."""
    m = _LEGACY_RE.match(key)
    return f"{m.group(1)}.{_LEGACY[m.group(2)]}.{m.group(3)}" if m else key


def _squeeze_1x1(state: Mapping[str, Any]) -> dict[str, Any]:
    """Attention projection weights stored as 1x1 convolutions become linear (out, in) weights, lazily."""

    def squeezed(value):
        def load() -> np.ndarray:
            array = np.asarray(value() if callable(value) else value)
            return array[:, :, 0, 0] if array.ndim == 4 and array.shape[2:] == (1, 1) else array

        return load

    return {k: squeezed(v) if _PROJ_WEIGHT_RE.search(k) else v for k, v in state.items()}


def _convert(abstract: PyTree, state: Mapping[str, Any], *, place: Place | None) -> PyTree:
    renamed = [rename_legacy(k) for k in state]
    if len(set(renamed)) != len(renamed):  # both spellings of one tensor: refuse rather than pick one
        twice = sorted({k for k in renamed if renamed.count(k) > 1})
        raise ConversionError(f"checkpoint holds both legacy and current names for {', '.join(twice)}")
    return load_state_dict(
        abstract, _squeeze_1x1(state), rename=rename_legacy, place=place, what="AutoencoderKL"
    )


@takes_load_options()
def load_vae(
    source: str | Mapping[str, Any],
    config: AutoencoderKLConfig | None = None,
    **options: Unpack[LoadOptions],
) -> tuple[Net, PyTree]:
    """(Net, params) from a ``vae/`` folder (config.json + safetensors) or an in-memory state dict
    (numpy arrays or loaders; torch layouts and names, current or legacy)."""
    return load_component(source, config, AutoencoderKLConfig, vae_net, options, _convert)


def vae_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    """The diffusers ``AutoencoderKL`` state dict (current key names, torch layouts) of jdistill parameters."""
    return to_state_dict(params)
