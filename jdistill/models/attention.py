"""Scaled dot-product attention with a selectable implementation.

- ``"xla"``: plain XLA ops, every platform, differentiable in both modes (``jax.jvp`` works, which sCM and
  MeanFlow need).
- ``"cudnn"``: cuDNN's fused kernel on NVIDIA GPUs (fp16/bf16); it has a custom VJP, so no forward mode.
- ``"auto"``: cuDNN on GPU for half-precision inputs, XLA otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn", "auto")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str = "xla",
    is_causal: bool = False,
    mask: jax.Array | None = None,
    upcast: bool = False,
) -> jax.Array:
    """Attention over (batch, length, heads, head_dim) arrays; ``upcast`` computes in float32 (SD2's fix)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")
    dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    chosen = impl
    if impl == "auto":
        half = q.dtype in (jnp.float16, jnp.bfloat16)
        chosen = "cudnn" if half and jax.default_backend() == "gpu" else "xla"
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=chosen)
    return out.astype(dtype)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    b, t, h, d = x.shape
    return x.reshape(b, t, h * d)
