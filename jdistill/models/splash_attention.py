"""TPU attention through JAX's Pallas splash-attention kernel, per device, batch-sharded under a mesh.

The kernel works on one example in the head-major layout (heads, length, head_dim), with block sizes that are
multiples of 128 and no built-in softmax scale; this wrapper scales the queries, pads lengths to the blocks
(padded keys masked through segment ids) and vmaps over the batch. Any head_dim works: the kernel tiles it
over 128 lanes itself (SD's 40, 64, 80 and 160 compile for TPU v5p). A Pallas call runs on one device's data,
so under a mesh with batch axes the call is wrapped in ``jax.shard_map`` over those axes; models stay
mesh-agnostic (the mesh comes from ``jax.set_mesh``).

The kernel has a custom VJP: ``jax.grad`` runs its fused backward kernels, ``jax.jvp`` cannot pass through it
(``attention.forward_mode_attention`` swaps in the chunked implementation there).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

LANES = 128  # the kernel's block sizes are multiples of this
BATCH_AXES = ("data", "fsdp")  # jdistill.parallel's batch axes (not imported: models must not need it)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(block, padded length): the block shrinks to the padded length for short sequences."""
    block = min(_round_up(block, LANES), _round_up(length, LANES))
    return block, _round_up(length, block)


def _kernel(heads: int, tq: int, tk: int, bq: int, bkv: int, causal: bool, interpret: bool):
    """Built per traced call, not cached: its mask tables become arrays of the trace that builds them."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    base = sa.CausalMask((tq, tk)) if causal else sa.FullMask((tq, tk))
    sizes = sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return sa.make_splash_mha(
        sa.MultiHeadMask([base] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _per_device(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int, block_kv: int, is_causal: bool, interpret: bool
) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, tq, h, d = q.shape
    tk = k.shape[1]
    bq, tq_pad = _blocks(tq, block_q)
    bkv, tk_pad = _blocks(tk, block_kv)

    def layout(x, length):  # (b, t, h, d) -> (b, h, t_pad, d)
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)
    qh, kh, vh = layout(q, tq_pad), layout(k, tk_pad), layout(v, tk_pad)
    segments = None
    if tk_pad != tk:  # padded keys sit in segment 1, which no query belongs to
        segments = SegmentIds(
            q=jnp.zeros((tq_pad,), jnp.int32), kv=(jnp.arange(tk_pad) >= tk).astype(jnp.int32)
        )
    kernel = _kernel(h, tq_pad, tk_pad, bq, bkv, is_causal, interpret)
    out = jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=segments))(qh, kh, vh)
    return out[:, :, :tq].transpose(0, 2, 1, 3)


def batch_axes_of_mesh(batch: int) -> tuple[str, ...] | None:
    """The mesh batch axes to shard_map over: () for one device's data, None when the kernel cannot be placed
    (the caller then uses a partitionable implementation): a batch the axes do not divide, or several devices
    but no mesh set (``jax.set_mesh``) to say how the arrays are split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return () if jax.device_count() == 1 else None
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a not in mesh.manual_axes)
    n = math.prod(mesh.shape[a] for a in axes)
    if n == 1:
        return ()
    return axes if batch % n == 0 else None


def mesh_platform() -> str:
    """The platform the computation is being traced for: the mesh's devices, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_q: int = 512,
    block_kv: int = 512,
    is_causal: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """Attention over (batch, length, heads, head_dim) arrays with the Pallas TPU kernel.

    Under a mesh whose batch axes divide the batch, each device runs the kernel on its rows (shard_map); other
    mesh axes see replicated inputs. Callers check divisibility first (``batch_axes_of_mesh``).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention takes (batch, length, heads, head_dim) arrays; got {q.shape}, {k.shape}, {v.shape}"
        )
    run = functools.partial(
        _per_device, block_q=block_q, block_kv=block_kv, is_causal=is_causal, interpret=interpret
    )
    axes = batch_axes_of_mesh(q.shape[0])
    if axes is None:
        raise ValueError(
            f"splash attention: batch {q.shape[0]} does not divide over the mesh batch axes {BATCH_AXES}"
        )
    if not axes:
        return run(q, k, v)
    mesh = jax.sharding.get_abstract_mesh()
    spec = PartitionSpec(axes)
    manual = frozenset(mesh.axis_names) - frozenset(
        mesh.manual_axes
    )  # Pallas calls cannot be auto-partitioned
    return jax.shard_map(run, in_specs=(spec,) * 3, out_specs=spec, axis_names=manual, check_vma=False)(
        q, k, v
    )
