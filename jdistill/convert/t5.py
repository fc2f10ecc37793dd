"""T5 encoder weights: transformers ``T5EncoderModel`` checkpoints <-> jdistill parameters.

The module tree mirrors transformers' names and ``convert.core`` maps the scanned blocks to per-layer keys, so
two keys need handling here:

- the relative position bias, ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`` in
  transformers (block 0 owns it, every block uses it), is ``encoder.relative_attention_bias`` here, outside the
  stack;
- ``encoder.embed_tokens.weight`` is tied to ``shared.weight``: ``state_dict()`` lists both, ``save_pretrained``
  writes only ``shared.weight``. Loading accepts it absent, and when present requires it to equal
  ``shared.weight`` (a checkpoint with two different tables is not a tied T5 encoder; transformers would keep
  ``shared`` silently). Checking it reads the table a second time. Export writes it, so an exported state dict
  equals transformers' ``state_dict()`` key for key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Unpack

import numpy as np

from jdistill.convert.core import ConversionError, load_state_dict, to_state_dict
from jdistill.convert.loader import BaseLoadOptions, Place, load_component, takes_load_options
from jdistill.models.net import Net
from jdistill.models.t5 import T5Config, t5_net

PyTree = Any
BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
MODEL_BIAS_KEY = "encoder.relative_attention_bias.weight"
SHARED_KEY = "shared.weight"
TIED_KEY = "encoder.embed_tokens.weight"
TIED_PATTERN = "^" + re.escape(TIED_KEY) + "$"  # checked against shared.weight, not loaded


def _to_model_key(key: str) -> str:
    if key == BIAS_KEY:
        return MODEL_BIAS_KEY
    if key == MODEL_BIAS_KEY:  # not a transformers key: report it as unexpected rather than merge it
        return "<not transformers'> " + key
    return key


def _to_torch_key(key: str) -> str:
    return BIAS_KEY if key == MODEL_BIAS_KEY else key


def _array(value: Any) -> np.ndarray:
    return np.asarray(value() if callable(value) else value)


def _check_tied(state: Mapping[str, Any]) -> None:
    if TIED_KEY not in state:
        return
    tied, shared = _array(state[TIED_KEY]), _array(state[SHARED_KEY])
    if tied.shape != shared.shape or not np.array_equal(tied, shared):
        raise ConversionError(
            f"checkpoint does not match the T5EncoderModel: {TIED_KEY} {tuple(tied.shape)} differs from "
            f"{SHARED_KEY} {tuple(shared.shape)}; the encoder's token embedding is tied to shared"
        )


def _convert(abstract: PyTree, state: Mapping[str, Any], *, place: Place | None) -> PyTree:
    try:
        params = load_state_dict(
            abstract,
            state,
            rename=_to_model_key,
            ignore=(TIED_PATTERN,),
            place=place,
            what="T5EncoderModel",
        )
    except ConversionError as err:
        if BIAS_KEY in state or MODEL_BIAS_KEY not in str(err):
            raise
        # core names missing keys by the model's names; say which checkpoint key that one stands for.
        raise ConversionError(f"{err} ({MODEL_BIAS_KEY} is the checkpoint's {BIAS_KEY})") from None
    _check_tied(state)
    return params


@takes_load_options(BaseLoadOptions)  # T5 has one attention kernel: no attention_impl
def load_t5(
    source: str | Mapping[str, Any], config: T5Config | None = None, **options: Unpack[BaseLoadOptions]
) -> tuple[Net, PyTree]:
    """(Net, params) from a ``text_encoder_2/``-style folder (config.json + safetensors) or an in-memory state
    dict. Strict: ``ConversionError`` names missing, unexpected and mis-shaped keys, and an
    ``encoder.embed_tokens.weight`` that differs from ``shared.weight``."""
    return load_component(source, config, T5Config, t5_net, options, _convert)


def t5_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    """The torch state dict of T5 encoder parameters, as transformers' ``T5EncoderModel.state_dict()`` lists it
    (the tied ``encoder.embed_tokens.weight`` included)."""
    out = to_state_dict(params, rename=_to_torch_key)
    out[TIED_KEY] = out[SHARED_KEY]
    return out
