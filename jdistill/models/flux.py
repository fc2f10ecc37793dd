"""FluxTransformer2DModel in Flax NNX, equal to diffusers' for FLUX.1-dev, FLUX.1-schnell and FLUX.1-lite.

Attribute names are diffusers' module names, so every torch key maps to a parameter path through the generic
rules of ``jdistill.convert.core``. The double-stream (``transformer_blocks``) and single-stream
(``single_transformer_blocks``) blocks are scanned stacks (``models/stack.py``): one block is traced whatever
the depth.

The transformer works on packed latent tokens: 2x2 patches of the VAE latents, (B, H/2 * W/2, 4C), in the order
of diffusers' ``FluxPipeline._pack_latents`` (``pack_latents`` here, from NHWC latents). Positions enter through
a 3-axis rotary embedding of per-token ids (``text_ids``: zeros; ``image_ids``: (0, row, column)). Ids given as
numpy arrays (static) get their frequencies in float64, as diffusers computes them; traced ids are computed in
float32.

Precision: matrix products and attention in ``precision.dtype``; layer norms, QK RMS norms, the modulation
(shift, scale, gate) and the rotary embedding in float32.

jdistill-only option ``timestep_delta_embeds`` (off in every diffusers checkpoint; a teacher converts and exports
exactly as without it): a second time input, ``timestep_delta`` (MeanFlow's t - r, in the units of ``timestep``),
embedded like the timestep (sinusoids of 1000 delta, then a two-layer MLP,
``time_text_embed.timestep_delta_embedder``) and added to the conditioning embedding ``temb``. With that MLP's
last linear at zero the model computes exactly what it computes without the option. The model then requires
``timestep_delta`` (pass 0 for r = t); without the option, passing one is an error.

jdistill-only option ``timestep_scale`` (default 1000, diffusers' fixed factor; a config at 1000 has no such key,
so a teacher converts and exports exactly as without it): the factor the timestep, the guidance scale and
``timestep_delta`` are multiplied by before their sinusoids. 1 gives O(1) time inputs, as T2I-Distill's
``FluxTransformer2DModelTimestepX1GuidanceX1``: forward-mode derivatives in time (sCM, MeanFlow) then do not go
through sinusoids of 1000 t.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill.models.attention import JointProjections, attention, merge_heads
from jdistill.models.configured import ConfiguredModule, configured_net
from jdistill.models.diffusers_config import config_kwargs, field_values, to_json
from jdistill.models.embeddings import timestep_embedding
from jdistill.models.feedforward import FeedForward
from jdistill.models.layers import FP32, Precision, linear, remat_policy
from jdistill.models.net import Net, build_layer, sharding_metadata
from jdistill.models.stack import Stack
from jdistill.parallel import constrain_batch

ROPE_THETA = 10000.0
NORM_EPS = 1e-6
TIME_PROJ_DIM = 256  # diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
MLP_RATIO = 4
FP16_MAX = 65504.0
DIFFUSERS_TIME_SCALE = 1000.0  # FluxTransformer2DModel.forward multiplies timestep and guidance by it

# Options of diffusers' config that jdistill does not implement (value: the only one accepted).
UNSUPPORTED_OPTIONS = {"patch_size": 1}
CLASS_NAME = "FluxTransformer2DModel"


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    # jdistill only (not a diffusers option): a second time input embedded into temb (MeanFlow's t - r).
    timestep_delta_embeds: bool = False
    # jdistill only: the factor on timestep, guidance and timestep_delta before their sinusoids (diffusers: 1000).
    timestep_scale: float = DIFFUSERS_TIME_SCALE

    @classmethod
    def from_dict(cls, d: dict) -> FluxConfig:
        """From a diffusers ``transformer/config.json`` dict; bookkeeping keys (``_class_name``, ...) are
        ignored, any option we do not implement raises a ValueError naming it."""
        name = d.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"config _class_name={name!r}: not a {CLASS_NAME}")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key.startswith("_") or key in fields:
                continue
            if key in UNSUPPORTED_OPTIONS:
                if value != UNSUPPORTED_OPTIONS[key]:
                    raise ValueError(
                        f"FLUX config {key}={value!r} is not supported (only {UNSUPPORTED_OPTIONS[key]!r})"
                    )
                continue
            raise ValueError(f"FLUX config option {key!r} is not supported")
        cfg = cls(**config_kwargs(cls, d))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        out = field_values(self)
        if not self.timestep_delta_embeds:  # jdistill's own option: a diffusers config has no such key
            del out["timestep_delta_embeds"]
        if self.timestep_scale == DIFFUSERS_TIME_SCALE:
            del out["timestep_scale"]
        return to_json({**out, **UNSUPPORTED_OPTIONS})

    def validate(self) -> None:
        if not (isinstance(self.timestep_scale, int | float) and self.timestep_scale > 0):
            raise ValueError(f"timestep_scale must be a positive number, got {self.timestep_scale!r}")
        dims = tuple(self.axes_dims_rope)
        if len(dims) != 3 or any(d % 2 for d in dims) or sum(dims) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {dims} must be three even sizes summing to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


# ------------------------------------------------------------------------------------------------ packing


def pack_latents(x):
    """NHWC latents (B, H, W, C) -> tokens (B, H/2 * W/2, 4C): 2x2 patches, channels ordered (c, dy, dx) as
    diffusers' ``_pack_latents`` does on NCHW latents. Works on numpy and JAX arrays."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens, height: int, width: int):
    """Inverse of ``pack_latents``: tokens (B, H/2 * W/2, 4C) -> NHWC latents (B, height, width, C)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"{n} tokens of width {d} are not a packed {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, d // 4)


def image_ids(h: int, w: int) -> np.ndarray:
    """(h*w, 3) position ids (0, row, column) of an h x w grid of packed tokens (diffusers'
    ``_prepare_latent_image_ids`` with the packed grid's size)."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(n: int) -> np.ndarray:
    """(n, 3) position ids of n text tokens: all zero, as FLUX's pipeline builds them."""
    return np.zeros((n, 3), np.float32)


# ------------------------------------------------------------------------------------------------ rotary


def rope_frequencies(
    ids, axes_dims: tuple[int, ...], theta: float = ROPE_THETA
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (L, sum(axes_dims)) float32, of diffusers' ``FluxPosEmbed`` (each angle repeated for
    its interleaved pair). Numpy ids: float64 angles as diffusers computes them; traced ids: float32."""
    exact = isinstance(ids, np.ndarray)
    xp = np if exact else jnp
    pos = ids.astype(np.float64 if exact else jnp.float32)
    cos, sin = [], []
    for i, dim in enumerate(axes_dims):
        inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        angles = pos[:, i, None] * (inv if exact else jnp.asarray(inv, jnp.float32))[None, :]
        cos.append(xp.repeat(xp.cos(angles), 2, axis=1))
        sin.append(xp.repeat(xp.sin(angles), 2, axis=1))
    return tuple(jnp.asarray(xp.concatenate(parts, axis=-1), jnp.float32) for parts in (cos, sin))


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate interleaved pairs of (B, L, heads, head_dim) ``x`` (diffusers' ``apply_rotary_emb`` with
    ``use_real_unbind_dim=-1``), in float32."""
    cos, sin = (r[None, :, None, :] for r in rope)
    x = x.astype(jnp.float32)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------------------------------ layers


def rms_norm(dim: int, rngs: nnx.Rngs, p: Precision) -> nnx.RMSNorm:
    """torch.nn.RMSNorm(dim, eps=1e-6) over the head dimension, in float32."""
    return build_layer(
        lambda r: nnx.RMSNorm(
            dim,
            epsilon=NORM_EPS,
            use_fast_variance=False,
            dtype=jnp.float32,
            param_dtype=p.param_dtype,
            scale_metadata=sharding_metadata(None),
            rngs=r,
        ),
        rngs,
    )


def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters (eps 1e-6), in float32 with torch's two-pass variance."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + NORM_EPS)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def gated_add(residual: jax.Array, gate: jax.Array, update: jax.Array) -> jax.Array:
    """residual + gate * update in float32, back in the residual's dtype. In float16 the sum is clipped to
    the finite range: diffusers clips its blocks' float16 outputs, and a cast would turn overflow into inf."""
    out = residual.astype(jnp.float32) + gate[:, None] * update.astype(jnp.float32)
    if residual.dtype == jnp.float16:
        out = jnp.clip(out, -FP16_MAX, FP16_MAX)
    return out.astype(residual.dtype)


class Modulation(nnx.Module):
    """The ``linear`` of diffusers' AdaLayerNormZero / AdaLayerNormZeroSingle / AdaLayerNormContinuous:
    silu(temb) -> ``chunks`` float32 vectors, in diffusers' chunk order."""

    def __init__(self, dim: int, chunks: int, rngs: nnx.Rngs, p: Precision):
        self.linear = linear(dim, chunks * dim, rngs, p, axes=("embed", "mlp"))
        self.chunks = chunks

    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        return jnp.split(self.linear(nnx.silu(temb)).astype(jnp.float32), self.chunks, axis=-1)


class FluxAttention(JointProjections, nnx.Module):
    """diffusers' FluxAttention: biased q/k/v, QK RMS norms per head, rotary embedding, joint attention over
    [text, image] tokens. ``joint``: the double-stream form (text projections ``add_*``, output projections);
    otherwise the single-stream form, which returns the merged heads without an output projection."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, rngs: nnx.Rngs, p: Precision, *, joint: bool, impl: str
    ):
        inner = heads * head_dim
        self.heads, self.impl, self.dtype = heads, impl, p.dtype
        self.norm_q = rms_norm(head_dim, rngs, p)
        self.norm_k = rms_norm(head_dim, rngs, p)
        self.to_q = linear(dim, inner, rngs, p, axes=("embed", "heads"))
        self.to_k = linear(dim, inner, rngs, p, axes=("embed", "heads"))
        self.to_v = linear(dim, inner, rngs, p, axes=("embed", "heads"))
        if joint:
            self.to_out = nnx.List([linear(inner, dim, rngs, p, axes=("heads", "embed"))])
            self.norm_added_q = rms_norm(head_dim, rngs, p)
            self.norm_added_k = rms_norm(head_dim, rngs, p)
            self.add_q_proj = linear(dim, inner, rngs, p, axes=("embed", "heads"))
            self.add_k_proj = linear(dim, inner, rngs, p, axes=("embed", "heads"))
            self.add_v_proj = linear(dim, inner, rngs, p, axes=("embed", "heads"))
            self.to_add_out = linear(inner, dim, rngs, p, axes=("heads", "embed"))
        else:
            self.to_out = self.add_q_proj = self.add_k_proj = self.add_v_proj = self.to_add_out = None
            self.norm_added_q = self.norm_added_k = None

    def __call__(self, x: jax.Array, rope, context: jax.Array | None = None):
        """Attention over ``x`` (single stream) or over [``context``, ``x``] (double stream, which returns
        the image and text outputs)."""
        q, k, v = self.image_qkv(x)
        if context is not None:
            cq, ck, cv = self.context_qkv(context)
            q, k, v = (jnp.concatenate([c, y], axis=1) for c, y in ((cq, q), (ck, k), (cv, v)))
        q, k = (apply_rope(y, rope).astype(self.dtype) for y in (q, k))
        out = merge_heads(attention(q, k, v.astype(self.dtype), impl=self.impl))
        if context is None:
            return out
        text, image = out[:, : context.shape[1]], out[:, context.shape[1] :]
        return self.to_out[0](image), self.to_add_out(text)


class FluxTransformerBlock(nnx.Module):
    """Double-stream (MMDiT) block; carry = (image tokens, text tokens), shared = (temb, rope)."""

    def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, p: Precision, impl: str):
        dim = cfg.inner_dim
        self.norm1 = Modulation(dim, 6, rngs, p)
        self.norm1_context = Modulation(dim, 6, rngs, p)
        self.attn = FluxAttention(
            dim, cfg.num_attention_heads, cfg.attention_head_dim, rngs, p, joint=True, impl=impl
        )
        self.ff = FeedForward(dim, rngs, p, mult=MLP_RATIO)
        self.ff_context = FeedForward(dim, rngs, p, mult=MLP_RATIO)
        self.dtype = p.dtype

    def __call__(
        self, carry: tuple[jax.Array, jax.Array], temb: jax.Array, rope
    ) -> tuple[jax.Array, jax.Array]:
        x, c = carry
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        attn_x, attn_c = self.attn(
            modulate(x, shift_msa, scale_msa).astype(self.dtype),
            rope,
            modulate(c, c_shift_msa, c_scale_msa).astype(self.dtype),
        )
        x = gated_add(x, gate_msa, attn_x)
        x = gated_add(x, gate_mlp, self.ff(modulate(x, shift_mlp, scale_mlp).astype(self.dtype)))
        c = gated_add(c, c_gate_msa, attn_c)
        c = gated_add(
            c, c_gate_mlp, self.ff_context(modulate(c, c_shift_mlp, c_scale_mlp).astype(self.dtype))
        )
        return constrain_batch(x), constrain_batch(c)


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block over the joint [text, image] tokens (the carry); shared = (temb, rope)."""

    def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, p: Precision, impl: str):
        dim = cfg.inner_dim
        hidden = dim * MLP_RATIO
        self.norm = Modulation(dim, 3, rngs, p)
        self.proj_mlp = linear(dim, hidden, rngs, p)
        self.proj_out = linear(dim + hidden, dim, rngs, p, axes=("mlp", "embed"))
        self.attn = FluxAttention(
            dim, cfg.num_attention_heads, cfg.attention_head_dim, rngs, p, joint=False, impl=impl
        )
        self.dtype = p.dtype

    def __call__(self, h: jax.Array, temb: jax.Array, rope) -> jax.Array:
        shift, scale, gate = self.norm(temb)
        n = modulate(h, shift, scale).astype(self.dtype)
        mlp = jax.nn.gelu(self.proj_mlp(n), approximate=True)
        out = self.proj_out(jnp.concatenate([self.attn(n, rope), mlp], axis=-1))
        return constrain_batch(gated_add(h, gate, out))


class TimestepEmbedding(nnx.Module):
    """linear_1 -> silu -> linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection(act silu))."""

    def __init__(self, din: int, dim: int, rngs: nnx.Rngs, p: Precision):
        self.linear_1 = linear(din, dim, rngs, p, axes=(None, "mlp"))
        self.linear_2 = linear(dim, dim, rngs, p, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(x)))


class TimeTextEmbedding(nnx.Module):
    """diffusers' CombinedTimestep(Guidance)TextProjEmbeddings: embed(k t) [+ embed(k g)] + proj(pooled), k =
    ``timestep_scale`` (diffusers: 1000); with ``timestep_delta_embeds`` (jdistill's) plus
    ``timestep_delta_embedder`` (sinusoids of k delta)."""

    def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, p: Precision):
        dim = cfg.inner_dim
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim, rngs, p)
        self.guidance_embedder = (
            TimestepEmbedding(TIME_PROJ_DIM, dim, rngs, p) if cfg.guidance_embeds else None
        )
        self.timestep_delta_embedder = (
            TimestepEmbedding(TIME_PROJ_DIM, dim, rngs, p) if cfg.timestep_delta_embeds else None
        )
        self.text_embedder = TimestepEmbedding(cfg.pooled_projection_dim, dim, rngs, p)
        self.dtype = p.dtype
        self.scale = float(cfg.timestep_scale)

    def _sinusoids(self, t: jax.Array) -> jax.Array:
        # diffusers scales by 1000 in float32 and then takes Timesteps(256, flip_sin_to_cos=True, shift 0).
        return timestep_embedding(t.astype(jnp.float32) * self.scale, TIME_PROJ_DIM).astype(self.dtype)

    def __call__(
        self,
        timestep: jax.Array,
        pooled: jax.Array,
        guidance: jax.Array | None,
        timestep_delta: jax.Array | None = None,
    ) -> jax.Array:
        emb = self.timestep_embedder(self._sinusoids(timestep))
        if self.timestep_delta_embedder is not None:
            if timestep_delta is None:
                raise ValueError(
                    "this FLUX transformer has timestep_delta_embeds: timestep_delta is required (0 for r = t)"
                )
            emb = emb + self.timestep_delta_embedder(self._sinusoids(timestep_delta))
        elif timestep_delta is not None:
            raise ValueError(
                "timestep_delta was given, but this FLUX transformer has no timestep_delta_embeds"
            )
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this FLUX transformer has guidance_embeds: cond['guidance'] is required")
            emb = emb + self.guidance_embedder(self._sinusoids(guidance))
        elif guidance is not None:
            raise ValueError("cond['guidance'] was given, but this FLUX transformer has no guidance_embeds")
        return emb + self.text_embedder(pooled.astype(self.dtype))


# ------------------------------------------------------------------------------------------------ model


class FluxTransformer2DModel(ConfiguredModule):
    """``__call__(hidden_states, timestep, cond, img_ids=..., txt_ids=None)`` -> the velocity on packed tokens
    (B, L, out_channels), diffusers' ``.sample``. ``timestep``: (B,) or a scalar in [0, 1] (the flow time,
    which diffusers' pipeline passes as ``timestep / 1000``); ``cond``: ``encoder_hidden_states`` (B, T, joint
    dim), ``pooled_projections`` (B, P) and, with ``guidance_embeds``, ``guidance`` (B,) (the guidance scale,
    e.g. 3.5). ``img_ids`` (L, 3) and ``txt_ids`` (T, 3; default zeros) as ``image_ids`` / ``text_ids``
    build them. ``timestep_delta`` (B,) or a scalar, like ``timestep``: the second time of a model with
    ``timestep_delta_embeds`` (required there, refused otherwise). ``on_latents`` does the same on NHWC latents
    (packing and ids included)."""

    def build(self, cfg: FluxConfig, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool | str) -> None:
        remat = remat_policy(remat)  # an unknown policy fails here, not at the first call
        self.dtype = p.dtype
        dim = cfg.inner_dim
        # Input features (latent channels, the text encoder's width) are split under FSDP like hidden dims.
        self.x_embedder = linear(cfg.in_channels, dim, rngs, p, axes=("mlp", "embed"))
        self.context_embedder = linear(cfg.joint_attention_dim, dim, rngs, p, axes=("mlp", "embed"))
        self.time_text_embed = TimeTextEmbedding(cfg, rngs, p)
        self.transformer_blocks = _stack(
            lambda r: FluxTransformerBlock(cfg, r, p, impl), cfg.num_layers, rngs, remat
        )
        self.single_transformer_blocks = _stack(
            lambda r: FluxSingleTransformerBlock(cfg, r, p, impl), cfg.num_single_layers, rngs, remat
        )
        self.norm_out = Modulation(dim, 2, rngs, p)  # AdaLayerNormContinuous: (scale, shift)
        self.proj_out = linear(dim, cfg.output_channels, rngs, p, axes=("embed", "mlp"))

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        cond: dict,
        *,
        img_ids,
        txt_ids=None,
        timestep_delta: jax.Array | None = None,
    ) -> jax.Array:
        b = hidden_states.shape[0]
        context = cond["encoder_hidden_states"]
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        guidance = cond.get("guidance")
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
        if timestep_delta is not None:
            timestep_delta = jnp.broadcast_to(jnp.asarray(timestep_delta, jnp.float32), (b,))
        temb = self.time_text_embed(t, cond["pooled_projections"], guidance, timestep_delta)
        x = constrain_batch(self.x_embedder(hidden_states.astype(self.dtype)))
        c = constrain_batch(self.context_embedder(context.astype(self.dtype)))
        txt_ids = text_ids(c.shape[1]) if txt_ids is None else txt_ids
        ids = _concat_ids(txt_ids, img_ids)
        if ids.shape[0] != c.shape[1] + x.shape[1]:
            raise ValueError(f"{ids.shape[0]} ids for {c.shape[1]} text and {x.shape[1]} image tokens")
        rope = rope_frequencies(ids, tuple(self.config.axes_dims_rope))
        if self.transformer_blocks is not None:
            x, c = self.transformer_blocks((x, c), temb, rope)
        h = jnp.concatenate([c, x], axis=1)
        if self.single_transformer_blocks is not None:
            h = self.single_transformer_blocks(h, temb, rope)
        x = h[:, c.shape[1] :]
        scale, shift = self.norm_out(temb)
        return self.proj_out(modulate(x, shift, scale).astype(self.dtype))

    def on_latents(
        self, latents: jax.Array, timestep: jax.Array, cond: dict, *, timestep_delta: jax.Array | None = None
    ) -> jax.Array:
        """The velocity on NHWC latents (B, H, W, in_channels/4) -> (B, H, W, out_channels/4)."""
        _, height, width, _ = latents.shape
        ids = image_ids(height // 2, width // 2)
        out = self(pack_latents(latents), timestep, cond, img_ids=ids, timestep_delta=timestep_delta)
        return unpack_latents(out, height, width)

    def delta_embedding(self, timestep_delta: jax.Array) -> jax.Array:
        """What ``timestep_delta`` adds to the conditioning embedding (float32): for a fixed delta a constant,
        which an export folds into a bias (``time_text_embed.text_embedder.linear_2``)."""
        embed = self.time_text_embed
        if embed.timestep_delta_embedder is None:
            raise ValueError("this FLUX transformer has no timestep_delta_embeds")
        delta = jnp.asarray(timestep_delta, jnp.float32).reshape(-1)
        return embed.timestep_delta_embedder(embed._sinusoids(delta)).astype(jnp.float32)


def _stack(make_block, num_layers: int, rngs: nnx.Rngs, remat: str) -> Stack | None:
    return Stack(make_block, num_layers, rngs, remat=remat) if num_layers else None


def _concat_ids(txt, img):
    if isinstance(txt, np.ndarray) and isinstance(img, np.ndarray):
        return np.concatenate([txt, img], axis=0)  # static: exact float64 frequencies
    return jnp.concatenate([jnp.asarray(txt), jnp.asarray(img)], axis=0)


def flux_net(
    config: FluxConfig, *, precision: Precision = FP32, attention_impl: str = "xla", remat: bool | str = False
) -> Net:
    """The FLUX transformer as a Net; ``net.variant(guidance_embeds=False)`` builds it with other config
    fields, and ``net.remake(config, dtype=..., param_dtype=..., remat_policy=...)`` with other options
    (None: these)."""
    return configured_net(
        "transformer",
        FluxTransformer2DModel,
        config,
        precision=precision,
        attention_impl=attention_impl,
        remat=remat,
    )
