"""Prompts: tokenizing them and encoding them the way each pipeline does (reading them: jdistill.data.text).

- SD1.x / SD2.x: one CLIP encoder, last hidden state (after the final layer norm).
- SDXL: two encoders, penultimate hidden states concatenated along features; the pooled (projected)
  embedding of the second encoder; ``time_ids`` = (original size, crop top-left, target size).
- FLUX, SD3 / SD3.5: CLIP and T5 (``FlowPromptEncoder``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.data.text import PromptSource, read_prompts  # noqa: F401  (their home was here)
from jdistill.models.net import Net

PyTree = Any
IDS = "input_ids."  # batch keys: "input_ids.<encoder name>"


@dataclasses.dataclass(frozen=True, eq=False)
class PromptEncoder:
    encoders: tuple[tuple[str, Net, str], ...]  # (component name, net, "last" | "penultimate")
    tokenizers: dict[str, Any]
    pooled_from: str | None
    time_ids: tuple[float, ...] | None  # SDXL micro-conditioning, None otherwise

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for name, _, _ in self.encoders:
            tok = self.tokenizers[name]
            ids = tok(
                prompts, padding="max_length", max_length=tok.model_max_length, truncation=True
            ).input_ids
            out[IDS + name] = np.asarray(ids, np.int32)
        return out

    def encode(self, params: dict[str, PyTree], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """UNet conditioning from token ids: encoder_hidden_states, and for SDXL text_embeds and time_ids."""
        hidden, pooled = [], None
        for name, net, layer in self.encoders:
            h, p = net.apply(params[name], batch[IDS + name], layer, method="encode_prompt")
            hidden.append(h.astype(jnp.float32))
            if name == self.pooled_from:
                pooled = p.astype(jnp.float32)
        cond = {"encoder_hidden_states": jnp.concatenate(hidden, axis=-1)}
        if self.pooled_from is not None:
            cond["text_embeds"] = pooled
        return self.with_time_ids(cond)

    def describe(self) -> dict:
        """The encoders, for an embedding cache's manifest."""
        return {
            "encoders": [[name, layer] for name, _, layer in self.encoders],
            "pooled_from": self.pooled_from,
            "lengths": {name: int(self.tokenizers[name].model_max_length) for name, _, _ in self.encoders},
        }

    def with_time_ids(self, cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Add SDXL's micro-conditioning (fixed by the resolution, not by the prompt) where the UNet takes it."""
        if self.time_ids is None or "time_ids" in cond:
            return cond
        n = cond["encoder_hidden_states"].shape[0]
        time_ids = jnp.broadcast_to(jnp.asarray(self.time_ids, jnp.float32), (n, len(self.time_ids)))
        return {**cond, "time_ids": time_ids}


@dataclasses.dataclass(frozen=True, eq=False)
class FlowPromptEncoder:
    """Prompt encoding of the flow-matching transformer pipelines, as diffusers' ``encode_prompt`` does it:

    - FLUX: CLIP-L's pooled output conditions the time embedding; T5's last hidden state (``t5_length``
      tokens: 512 for dev and lite, 256 for schnell) is the sequence. No attention mask reaches T5.
    - SD3 / SD3.5: the two CLIP encoders' penultimate hidden states, concatenated on features and zero-padded
      to T5's width, followed by T5's states along the sequence (77 + 256 tokens); pooled = both CLIP
      projections concatenated.

    ``clips`` lists the CLIP encoders' component names in the pipeline's order, ``t5`` the T5 encoder's.
    """

    family: str  # "flux" or "sd3"
    clips: tuple[tuple[str, Net], ...]
    t5: tuple[str, Net]
    tokenizers: dict[str, Any]
    t5_length: int

    # The same interface as PromptEncoder (the worlds and the embedding cache call these).
    time_ids = None

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for name, _ in self.clips:
            tok = self.tokenizers[name]
            ids = tok(
                prompts, padding="max_length", max_length=tok.model_max_length, truncation=True
            ).input_ids
            out[IDS + name] = np.asarray(ids, np.int32)
        name = self.t5[0]
        ids = self.tokenizers[name](prompts, padding="max_length", max_length=self.t5_length, truncation=True)
        out[IDS + name] = np.asarray(ids.input_ids, np.int32)
        return out

    def encode(self, params: dict[str, PyTree], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The transformer's conditioning: ``encoder_hidden_states`` and ``pooled_projections`` (float32)."""
        t5_name, t5_net = self.t5
        t5 = t5_net.apply(params[t5_name], batch[IDS + t5_name]).astype(jnp.float32)
        layer = "last" if self.family == "flux" else "penultimate"
        hidden, pooled = [], []
        for name, net in self.clips:
            h, p = net.apply(params[name], batch[IDS + name], layer, method="encode_prompt")
            hidden.append(h.astype(jnp.float32))
            pooled.append(p.astype(jnp.float32))
        if self.family == "flux":
            return {"encoder_hidden_states": t5, "pooled_projections": pooled[0]}
        # To T5's width: zero-padded, or cropped where the CLIP states are wider (diffusers' F.pad with a
        # negative width crops).
        width = t5.shape[-1]
        clip = jnp.concatenate(hidden, axis=-1)[..., :width]
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        return {
            "encoder_hidden_states": jnp.concatenate([clip, t5], axis=-2),
            "pooled_projections": jnp.concatenate(pooled, axis=-1),
        }

    def with_time_ids(self, cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return cond

    def describe(self) -> dict:
        """The encoders, for an embedding cache's manifest (``flow_world.cache_encoders`` is what a run
        compares: a run on the cache loads no text encoder to compare their outputs)."""
        return {
            "family": self.family,
            "clips": [name for name, _ in self.clips],
            "t5": self.t5[0],
            "t5_length": int(self.t5_length),
            "clip_length": int(self.tokenizers[self.clips[0][0]].model_max_length),
        }
