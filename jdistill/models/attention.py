"""Scaled dot-product attention with a selectable implementation (``teacher.attention_impl``).

- ``"xla"``: plain XLA ops (``jax.nn.dot_product_attention``), every platform, both differentiation modes. It
  materialises the float32 (batch, heads, queries, keys) probabilities: about 2.1 GB for one SD1.5 64x64
  self-attention layer at batch 4.
- ``"chunked"``: memory-efficient pure JAX (``chunked_attention.py``): query and key blocks with an online
  softmax, each query block rematerialised in the backward pass. Every platform, both modes.
- ``"cudnn"``: cuDNN's fused kernel on NVIDIA GPUs (fp16/bf16).
- ``"splash"``: the Pallas splash-attention kernel on TPU (``splash_attention.py``), batch-sharded under a
  mesh. Key lengths below ``splash_min_length`` (77-token cross-attention, small feature maps) use XLA; an
  explicit mask, a batch the mesh's batch axes do not divide, or several devices with no mesh set
  (``jax.set_mesh``, which the trainer sets around its steps) use the chunked path.
- ``"auto"``: splash on TPU, cuDNN on GPU for half-precision inputs with key lengths that are multiples of
  64 (latent self-attention), XLA otherwise (e.g. the 77-token cross-attention).

Forward mode: the fused kernels (cudnn, splash) have custom VJPs, through which ``jax.jvp`` cannot pass.
Code that takes a JVP of a network (sCM, MeanFlow via ``jdistill.diffusion.jvp``) traces it inside
``forward_mode_attention()``, where those two resolve to ``"chunked"``; the same network keeps its fused
kernel everywhere else. The choice is made at trace time, so the context must enclose the traced call.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jdistill.models.chunked_attention import chunked_attention
from jdistill.models.splash_attention import batch_axes_of_mesh, mesh_platform, splash_attention

ATTENTION_IMPLS = ("xla", "chunked", "cudnn", "splash", "auto")
FUSED = ("cudnn", "splash")  # custom-VJP kernels: no forward mode
CUDNN_AUTO_MULTIPLE = 64  # "auto" takes cuDNN for key lengths that are multiples of this


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Trace-time settings of the implementations (``attention_options`` changes them for a block of code)."""

    block_q: int = 512  # chunked: queries per rematerialised block
    block_kv: int = 1024  # chunked: keys per online-softmax step
    remat_steps: bool = (
        False  # chunked: recompute each key block's probabilities too (less memory, more FLOPs)
    )
    splash_block_q: int = 512  # splash kernel tiles (multiples of 128)
    splash_block_kv: int = 512
    splash_min_length: int = 1024  # splash only from this many keys; shorter ones use XLA
    forward_mode: bool = False  # fused kernels resolve to "chunked" (set by forward_mode_attention)
    interpret: bool = False  # run the Pallas kernel in the interpreter (any platform; tests)


_OPTIONS: contextvars.ContextVar[AttentionOptions] = contextvars.ContextVar(
    "jdistill_attention_options",
    default=AttentionOptions(),  # noqa: B039 (frozen dataclass: never mutated)
)


def current_options() -> AttentionOptions:
    return _OPTIONS.get()


@contextlib.contextmanager
def attention_options(**changes) -> Iterator[AttentionOptions]:
    """Override ``AttentionOptions`` fields for the attention calls traced inside the block."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(AttentionOptions)}
    if unknown:
        raise ValueError(f"unknown attention options {sorted(unknown)}")
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **changes))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


def forward_mode_attention() -> contextlib.AbstractContextManager[AttentionOptions]:
    """Trace attention forward-differentiably: wrap ``jax.jvp`` of a network in this."""
    return attention_options(forward_mode=True)


def resolve_impl(
    impl: str, *, dtype, batch: int, key_length: int, masked: bool, options: AttentionOptions | None = None
) -> str:
    """The implementation one call runs: ``impl`` after "auto", forward mode and splash's routing rules."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")
    o = current_options() if options is None else options
    chosen = impl
    if impl == "auto":
        platform = mesh_platform()
        half = jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16)
        # cuDNN's fused kernel rejects some key lengths in training (an H200 with jax 0.11.2 refused SD's
        # 77-token cross-attention); self-attention over latent grids is a multiple of 64 and runs fused.
        cudnn_ok = half and platform == "gpu" and key_length % CUDNN_AUTO_MULTIPLE == 0
        chosen = "splash" if platform == "tpu" else "cudnn" if cudnn_ok else "xla"
    if chosen in FUSED and o.forward_mode:
        return "chunked"
    if chosen == "splash":
        if key_length < o.splash_min_length:
            return "xla"
        if masked or batch_axes_of_mesh(batch) is None:
            return "chunked"
        if not o.interpret and mesh_platform() != "tpu":
            raise ValueError(
                f"attention_impl 'splash' runs on TPU only (tracing for {mesh_platform()!r}); "
                "use 'chunked' or 'auto' elsewhere"
            )
    return chosen


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
    dtype = q.dtype
    o = current_options()
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    chosen = resolve_impl(
        impl, dtype=q.dtype, batch=q.shape[0], key_length=k.shape[1], masked=mask is not None
    )
    if chosen == "chunked":
        out = chunked_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            block_q=o.block_q,
            block_kv=o.block_kv,
            remat_steps=o.remat_steps,
        )
    elif chosen == "splash":
        out = splash_attention(
            q,
            k,
            v,
            block_q=o.splash_block_q,
            block_kv=o.splash_block_kv,
            is_causal=is_causal,
            interpret=o.interpret,
        )
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=chosen)
    return out.astype(dtype)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    b, t, h, d = x.shape
    return x.reshape(b, t, h * d)


class JointProjections:
    """The query/key/value side of diffusers' joint (MMDiT) attention, shared by FLUX's and SD3's attention
    modules. The module holds ``heads``, the image stream's ``to_q``/``to_k``/``to_v`` with per-head
    ``norm_q``/``norm_k`` (None: no QK norm) and the text stream's ``add_q_proj``/``add_k_proj``/``add_v_proj``
    with ``norm_added_q``/``norm_added_k``."""

    def image_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self._heads_qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)

    def context_qkv(self, context: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        projections = (self.add_q_proj, self.add_k_proj, self.add_v_proj)
        return self._heads_qkv(context, *projections, self.norm_added_q, self.norm_added_k)

    def _heads_qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (split_heads(f(x), self.heads) for f in (to_q, to_k, to_v))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v
