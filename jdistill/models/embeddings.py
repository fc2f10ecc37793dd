"""Timestep embeddings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of a (B,) time vector, with the options of diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def guidance_embedding(w: jax.Array, dim: int) -> jax.Array:
    """LCM's guidance-scale embedding (diffusers' ``get_guidance_scale_embedding``): sinusoids of 1000 w."""
    return timestep_embedding(
        jnp.asarray(w, jnp.float32) * 1000.0, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0
    )
