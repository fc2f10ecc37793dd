"""SD3Transformer2DModel weights: diffusers checkpoints <-> jdistill parameters.

Every key but the joint blocks' is the model's own (``convert.core``'s generic rules). The blocks are scanned
in runs (``jdistill.models.sd3``): diffusers' ``transformer_blocks.{i}`` is

    transformer_blocks_dual.{i}        for i < d              (the dual-attention run)
    transformer_blocks.{i - d}         for d <= i < L - 1     (the plain run)
    last_block                         for i = L - 1

with d and L read off the parameter tree (the stacks' layer axes), so export needs no config. Loading checks
the checkpoint's key set in diffusers' numbering first, so a missing or unexpected key is named as the
checkpoint names it (``convert.core`` would name a missing block key by the model's numbering).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Unpack

import jax
import numpy as np

from jdistill.convert.core import ConversionError, _list, expected_keys, load_state_dict, to_state_dict
from jdistill.convert.loader import LoadOptions, Place, load_component, takes_load_options
from jdistill.models.naming import STACKED
from jdistill.models.net import Net
from jdistill.models.sd3 import SD3Config, sd3_net

PyTree = Any
WHAT = "SD3Transformer2DModel"
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")
_MODEL_BLOCK = re.compile(r"^(transformer_blocks_dual|transformer_blocks)\.(\d+)\.(.*)$")


def block_runs(tree: PyTree) -> tuple[int, int]:
    """(dual, plain) blocks before the last, from a parameter tree or its abstract shapes."""

    def layers(name: str) -> int:
        stack = tree.get(name)
        return jax.tree.leaves(stack[STACKED])[0].shape[0] if stack else 0

    return layers("transformer_blocks_dual"), layers("transformer_blocks")


def to_model_key(dual: int, plain: int) -> Callable[[str], str]:
    """diffusers' key -> the model's (keys outside the blocks, and block indices past the last, unchanged)."""

    def rename(key: str) -> str:
        m = _BLOCK.match(key)
        if not m:
            return key
        i, rest = int(m.group(1)), m.group(2)
        if i < dual:
            return f"transformer_blocks_dual.{i}.{rest}"
        if i < dual + plain:
            return f"transformer_blocks.{i - dual}.{rest}"
        return f"last_block.{rest}" if i == dual + plain else key

    return rename


def to_checkpoint_key(dual: int, plain: int) -> Callable[[str], str]:
    """The model's key -> diffusers' (inverse of ``to_model_key`` on the model's keys)."""

    def rename(key: str) -> str:
        if key.startswith("last_block."):
            return f"transformer_blocks.{dual + plain}.{key[len('last_block.') :]}"
        m = _MODEL_BLOCK.match(key)
        if not m:
            return key
        offset = 0 if m.group(1) == "transformer_blocks_dual" else dual
        return f"transformer_blocks.{int(m.group(2)) + offset}.{m.group(3)}"

    return rename


def _check_keys(abstract: PyTree, state: Mapping[str, Any]) -> None:
    """Raise ``ConversionError`` naming every missing and unexpected key, in the checkpoint's numbering."""
    back = to_checkpoint_key(*block_runs(abstract))
    wanted = {back(k) for k in expected_keys(abstract)}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    problems = [
        f"{len(v)} {label}: {_list(v)}"
        for label, v in (("missing", missing), ("unexpected", unexpected))
        if v
    ]
    if problems:
        raise ConversionError(f"checkpoint does not match the {WHAT}: " + "; ".join(problems))


def _convert(abstract: PyTree, state: Mapping[str, Any], *, place: Place | None) -> PyTree:
    _check_keys(abstract, state)
    rename = to_model_key(*block_runs(abstract))
    return load_state_dict(abstract, state, rename=rename, place=place, what=WHAT)


@takes_load_options()
def load_sd3(
    source: str | Mapping[str, Any], config: SD3Config | None = None, **options: Unpack[LoadOptions]
) -> tuple[Net, PyTree]:
    """(Net, params) from a ``transformer/`` folder (config.json + safetensors) or an in-memory state dict."""
    return load_component(source, config, SD3Config, sd3_net, options, _convert)


def sd3_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    """diffusers' state dict (numpy, torch layouts and numbering) of SD3 parameters."""
    return to_state_dict(params, rename=to_checkpoint_key(*block_runs(params)))
