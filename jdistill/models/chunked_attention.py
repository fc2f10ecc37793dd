"""Memory-efficient attention in plain JAX: query blocks x key/value blocks with an online softmax.

The L x L probability matrix is never formed. Each query block runs a scan over key/value blocks that keeps a
running maximum, a running sum of exponentials and an unnormalised output (float32 whatever the input dtype),
and each query block is wrapped in ``jax.checkpoint``, so the backward pass recomputes one block at a time
and holds O(block_q x length) instead of O(length^2). There is no custom derivative rule, so ``jax.grad`` and
``jax.jvp`` both work: this is the forward-mode path for the fused kernels (see ``attention.py``).

Lengths need not divide the blocks: queries and keys are zero-padded and padded keys masked out.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# A large finite logit for masked keys: exp(masked - real max) underflows to exactly 0, and a row whose every
# key is masked stays finite (uniform weights, as jax.nn.dot_product_attention's XLA path gives).
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _mask_blocks(
    mask: jax.Array, b: int, h: int, tq: int, tk: int, nq: int, bq: int, nk: int, bkv: int
) -> jax.Array:
    """A boolean mask broadcastable to (b, h, tq, tk) as (nq or 1, nk, mb, mh, bq or 1, bkv) blocks."""
    if mask.ndim != 4:
        raise ValueError(
            f"attention mask must have 4 dims (batch, heads, queries, keys); got shape {mask.shape}"
        )
    mb, mh, mq, _ = mask.shape
    try:
        mask = jnp.broadcast_to(mask.astype(bool), (mb, mh, mq if mq == 1 else tq, tk))
    except ValueError as err:
        raise ValueError(
            f"attention mask of shape {mask.shape} does not broadcast to {(b, h, tq, tk)}"
        ) from err
    if mb not in (1, b) or mh not in (1, h):
        raise ValueError(f"attention mask of shape {mask.shape} does not broadcast to {(b, h, tq, tk)}")
    mask = _pad(mask, 3, nk * bkv)  # padded keys: False
    if mq == 1:
        return mask.reshape(mb, mh, 1, 1, nk, bkv).transpose(2, 4, 0, 1, 3, 5)
    mask = _pad(mask, 2, nq * bq)
    return mask.reshape(mb, mh, nq, bq, nk, bkv).transpose(2, 4, 0, 1, 3, 5)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    block_q: int = 512,
    block_kv: int = 1024,
    remat_steps: bool = False,
    scale: float | None = None,
) -> jax.Array:
    """softmax(q k^T * scale) v over (batch, length, heads, head_dim) arrays, in blocks.

    ``mask`` (True = attend) broadcasts to (batch, heads, queries, keys); ``is_causal`` lets query i see keys
    j <= i. ``scale`` defaults to 1/sqrt(head_dim). The result has q's dtype. ``remat_steps`` also recomputes
    each key block's probabilities in the backward pass instead of keeping a query block's (block_q x length):
    about half the gradient's temporaries for one more pass of q k^T (SD1.5 64x64 layer, 4 samples per v5p
    chip, float32: 543 -> 260 MiB).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention takes (batch, length, heads, head_dim) arrays; got {q.shape}, {k.shape}, {v.shape}"
        )
    if block_q < 1 or block_kv < 1:
        raise ValueError(
            f"attention block sizes must be positive; got block_q={block_q}, block_kv={block_kv}"
        )
    b, tq, h, d = q.shape
    tk = k.shape[1]
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"attention shapes do not agree: q {q.shape}, k {k.shape}, v {v.shape}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bq, bkv = min(block_q, tq), min(block_kv, tk)
    nq, nk = -(-tq // bq), -(-tk // bkv)
    dtype = q.dtype

    # (n blocks, batch, block, heads, dim): scans run over the leading axis.
    qb = _pad(q, 1, nq * bq).reshape(b, nq, bq, h, d).swapaxes(0, 1)
    kb = _pad(k, 1, nk * bkv).reshape(b, nk, bkv, h, d).swapaxes(0, 1)
    vb = _pad(v, 1, nk * bkv).reshape(b, nk, bkv, h, v.shape[3]).swapaxes(0, 1)
    key_pos = jnp.arange(nk * bkv, dtype=jnp.int32).reshape(nk, bkv)
    blocks = None if mask is None else _mask_blocks(mask, b, h, tq, tk, nq, bq, nk, bkv)

    def one_query_block(q_blk: jax.Array, q_index: jax.Array, mask_row: jax.Array | None) -> jax.Array:
        q_pos = q_index * bq + jnp.arange(bq, dtype=jnp.int32)

        def step(carry, xs):
            m, denom, acc = carry
            k_blk, v_blk, k_pos, m_blk = xs
            s = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            valid = (k_pos < tk)[None, None, None, :]
            if is_causal:
                valid = valid & (k_pos[None, :] <= q_pos[:, None])[None, None]
            if m_blk is not None:
                valid = valid & m_blk
            s = jnp.where(valid, s, MASKED)
            # The output does not depend on the shift, so its derivative is zero: stop_gradient is exact.
            m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            denom = denom * correction + p.sum(-1)
            pv = jnp.einsum(
                "bhqk,bkhd->bhqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32
            )
            return (m_new, denom, acc * correction[..., None] + pv), None

        init = (
            jnp.full((b, h, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, bq), jnp.float32),
            jnp.zeros((b, h, bq, v.shape[3]), jnp.float32),
        )
        body = jax.checkpoint(step) if remat_steps else step
        (_, denom, acc), _ = jax.lax.scan(body, init, (kb, vb, key_pos, mask_row))
        return (acc / denom[..., None]).transpose(0, 2, 1, 3).astype(dtype)  # (b, bq, h, dv)

    block = jax.checkpoint(one_query_block)
    q_index = jnp.arange(nq, dtype=jnp.int32)
    if blocks is None:
        out = jax.lax.map(lambda xs: block(xs[0], xs[1], None), (qb, q_index))
    elif blocks.shape[0] == nq:  # a mask per query block
        out = jax.lax.map(lambda xs: block(*xs), (qb, q_index, blocks))
    else:  # a mask over keys only, shared by every query block
        out = jax.lax.map(lambda xs: block(xs[0], xs[1], blocks[0]), (qb, q_index))
    return out.swapaxes(0, 1).reshape(b, nq * bq, h, v.shape[3])[:, :tq]
