"""SD3Transformer2DModel (MMDiT) in Flax NNX, equal to diffusers' for SD3-medium, SD3.5-medium and
SD3.5-large.

Data is NHWC: ``sample`` (B, H, W, C) latents, ``cond`` a dict with ``encoder_hidden_states`` (B, T,
joint_attention_dim) and ``pooled_projections`` (B, pooled_projection_dim); ``timesteps`` is fed as diffusers
takes it (SD3's pipelines pass sigma * 1000).

Module tree. Attribute names are diffusers' module names (``pos_embed.proj``, ``time_text_embed.
timestep_embedder.linear_1``, ``attn.add_q_proj``, ``ff.net.0.proj``, ``norm_out.linear``, ...), except the
joint blocks, which are scanned (``models/stack.py``) in runs of identical blocks:

    transformer_blocks_dual.stacked   diffusers' blocks 0 .. d-1        (dual attention: SD3.5's ``attn2``)
    transformer_blocks.stacked        diffusers' blocks d .. L-2        (model index = diffusers' index - d)
    last_block                        diffusers' block L-1              (``context_pre_only``: no text output)

with ``d = len(dual_attention_layers)`` (a leading run 0 .. d-1, as every released model has; the last block
is dual too when d = L). ``jdistill.convert.sd3`` renames the block keys between the two numberings.

``pos_embed.pos_embed`` is diffusers' persistent buffer (the 2-d sin-cos table of ``pos_embed_max_size``^2
positions, part of the state dict): it is loaded and exported like a parameter, initialised to diffusers'
table, cropped to the latent's patch grid as ``PatchEmbed.cropped_pos_embed`` does, and never receives a
gradient (a buffer in torch). It is counted by ``Net.num_params``; torch's ``parameters()`` does not count it.

Precision: matrix products run in ``precision.dtype``; layer norms, RMS norms, the adaLN modulations and the
gated residual updates in float32.

jdistill-only option ``timestep_delta_embeds`` (off in every diffusers checkpoint; a teacher converts and exports
exactly as without it): a second time input, ``timestep_delta`` (MeanFlow's t - r, in the units of
``timesteps``: 1000 (t - r)), embedded like the timestep (the same sinusoids, then a two-layer MLP,
``time_text_embed.timestep_delta_embedder``) and added to the conditioning embedding ``temb``. With that MLP's
last linear at zero the model computes exactly what it computes without the option. The model then requires
``timestep_delta`` (pass 0 for r = t); without the option, passing one is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.attention import JointProjections, attention, merge_heads
from jdistill.models.configured import ConfiguredModule, configured_net
from jdistill.models.diffusers_config import config_kwargs, to_json
from jdistill.models.embeddings import timestep_embedding
from jdistill.models.feedforward import FeedForward
from jdistill.models.layers import (
    FP32,
    Precision,
    block_caller,
    conv,
    layer_norm,
    linear,
    remat_policy,
)
from jdistill.models.net import Net, build_layer, sharding_metadata
from jdistill.models.stack import Stack
from jdistill.parallel import constrain_batch

QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """diffusers' ``SD3Transformer2DModel`` config (defaults: diffusers')."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    # jdistill only (not a diffusers option): a second time input embedded into temb (MeanFlow's t - r).
    timestep_delta_embeds: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SD3Config:
        """From a diffusers ``transformer/config.json`` dict; bookkeeping keys (``_class_name``, ...) are
        ignored and any other key that is not an option implemented here is refused by name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"SD3 config options {unknown} are not supported")
        kwargs = config_kwargs(cls, d)
        if kwargs.get("out_channels", 0) is None:  # diffusers: out_channels defaults to in_channels
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.timestep_delta_embeds:  # jdistill's own option: a diffusers config has no such key
            del out["timestep_delta_embeds"]
        return to_json(out)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_dual(self) -> int:
        return len(self.dual_attention_layers)

    def validate(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"SD3 config qk_norm={self.qk_norm!r} is not supported (one of {QK_NORMS})")
        if (
            tuple(self.dual_attention_layers) != tuple(range(self.num_dual))
            or self.num_dual > self.num_layers
        ):
            raise ValueError(
                f"SD3 config dual_attention_layers={self.dual_attention_layers!r} is not supported: only a "
                f"leading run 0 .. d-1 of the {self.num_layers} layers"
            )
        if self.pos_embed_max_size is None:
            raise ValueError("SD3 config pos_embed_max_size=None is not supported (a cropped position table)")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"SD3 config caption_projection_dim={self.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {self.inner_dim} (the joint blocks' width)"
            )
        if self.inner_dim % 4:
            raise ValueError(f"SD3 width {self.inner_dim} must be a multiple of 4 (2-d sin-cos positions)")
        if self.num_layers < 1:
            raise ValueError(f"SD3 config num_layers={self.num_layers}: at least one layer")

    def block_runs(self) -> tuple[int, int]:
        """(dual-attention blocks before the last, plain blocks before the last)."""
        dual = min(self.num_dual, self.num_layers - 1)
        return dual, self.num_layers - 1 - dual


# ------------------------------------------------------------------------------------------------ layers


def pos_table(dim: int, grid: int, base: int) -> jax.Array:
    """diffusers' ``get_2d_sincos_pos_embed(dim, grid, base_size=base)`` as (1, grid*grid, dim) float32: the
    first half of the channels encodes the column, the second the row (diffusers' meshgrid order). Computed in
    float32, traceable (diffusers: float64 then rounded): within 1e-5 of diffusers' table for SD3's sizes;
    loading a checkpoint replaces it."""
    pos = jnp.arange(grid, dtype=jnp.float32) / jnp.float32(grid / base)
    omega = 1.0 / 10000 ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim / 4))

    def sincos(p):
        out = p.reshape(-1)[:, None] * omega[None, :]
        return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)

    rows, cols = jnp.meshgrid(pos, pos, indexing="ij")
    return jnp.concatenate([sincos(cols), sincos(rows)], axis=1)[None]


class PatchEmbed(nnx.Module):
    """Patchify convolution plus the cropped position table (diffusers' ``PatchEmbed``, ``pos_embed_max_size``
    set)."""

    def __init__(self, cfg: SD3Config, rngs: nnx.Rngs, p: Precision):
        dim, size = cfg.inner_dim, cfg.pos_embed_max_size
        self.patch_size, self.max_size, self.dtype = cfg.patch_size, size, p.dtype
        self.proj = conv(cfg.in_channels, dim, cfg.patch_size, rngs, p, stride=cfg.patch_size)
        base = cfg.sample_size // cfg.patch_size
        # Positions are a table like a vocabulary: that axis takes FSDP's split (SD3.5-medium's is 0.9 GB).
        self.pos_embed = build_layer(
            lambda r: nnx.Param(
                pos_table(dim, size, base).astype(p.param_dtype), **sharding_metadata(None, "vocab", "embed")
            ),
            rngs,
        )

    def cropped(self, h: int, w: int) -> jax.Array:
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"a {h}x{w} patch grid exceeds pos_embed_max_size {self.max_size}")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = jax.lax.stop_gradient(self.pos_embed[...]).reshape(self.max_size, self.max_size, -1)
        return table[top : top + h, left : left + w].reshape(1, h * w, -1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, _ = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"latents {height}x{width} are not a multiple of patch_size {self.patch_size}")
        tokens = self.proj(x.astype(self.dtype))
        h, w = tokens.shape[1:3]
        tokens = tokens.reshape(b, h * w, -1)
        return (tokens.astype(jnp.float32) + self.cropped(h, w).astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nnx.Module):
    """diffusers' ``RMSNorm`` with a weight (torch key ``weight``; ``scale`` here), in float32."""

    def __init__(self, dim: int, eps: float, p: Precision):
        self.eps, self.dtype = eps, p.dtype
        self.scale = nnx.Param(jnp.ones((dim,), p.param_dtype), **sharding_metadata(None))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def _rms_norm(dim: int, rngs: nnx.Rngs, p: Precision) -> RMSNorm:
    return build_layer(lambda r: RMSNorm(dim, 1e-6, p), rngs)


class Attention(JointProjections, nnx.Module):
    """diffusers' ``Attention`` with ``JointAttnProcessor2_0``: biased projections, optional per-head RMS
    q/k norms; ``joint`` adds the text stream's projections (``add_*_proj``), attended jointly with the image
    tokens in the order [image, text]; ``context_out`` adds ``to_add_out`` (absent in the last block)."""

    def __init__(
        self, dim, heads, head_dim, rngs, p: Precision, *, qk_norm: bool, joint: bool, context_out: bool, impl
    ):
        inner = heads * head_dim
        self.heads, self.impl = heads, impl

        def proj_in():
            return linear(dim, inner, rngs, p, axes=("embed", "heads"))

        def norm():
            return _rms_norm(head_dim, rngs, p) if qk_norm else None

        self.to_q, self.to_k, self.to_v = proj_in(), proj_in(), proj_in()
        self.norm_q, self.norm_k = norm(), norm()
        self.to_out = nnx.List([linear(inner, dim, rngs, p, axes=("heads", "embed"))])
        # Assigned once: NNX fixes an attribute as data (a layer) or static (None) when it is first set.
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (
            (proj_in(), proj_in(), proj_in()) if joint else (None, None, None)
        )
        self.norm_added_q, self.norm_added_k = (norm(), norm()) if joint else (None, None)
        self.to_add_out = (
            linear(inner, dim, rngs, p, axes=("heads", "embed")) if joint and context_out else None
        )

    def __call__(self, x: jax.Array, context: jax.Array | None = None):
        """The image tokens' output, or (image output, text output or None) with a ``context``."""
        q, k, v = self.image_qkv(x)
        n = x.shape[1]
        if context is not None:
            cq, ck, cv = self.context_qkv(context)
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
        out = merge_heads(attention(q, k, v, impl=self.impl))
        image = self.to_out[0](out[:, :n])
        if context is None:
            return image
        return image, (self.to_add_out(out[:, n:]) if self.to_add_out is not None else None)


class AdaLayerNormZero(nnx.Module):
    """diffusers' ``AdaLayerNormZero`` (6 chunks) or ``SD35AdaLayerNormZeroX`` (9): ``__call__`` returns the
    parameter-free layer norm of ``x`` and the chunks of ``linear(silu(temb))`` as (B, 1, D), all float32."""

    def __init__(self, dim: int, chunks: int, rngs, p: Precision):
        self.chunks = chunks
        self.linear = linear(dim, chunks * dim, rngs, p)
        self.norm = layer_norm(dim, 1e-6, rngs, p, affine=False)

    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        emb = self.linear(nnx.silu(temb)).astype(jnp.float32)[:, None, :]
        return self.norm(x).astype(jnp.float32), jnp.split(emb, self.chunks, axis=-1)


class AdaLayerNormContinuous(nnx.Module):
    """diffusers' ``AdaLayerNormContinuous`` (no affine norm): the linear output splits as (scale, shift)."""

    def __init__(self, dim: int, rngs, p: Precision):
        self.dtype = p.dtype
        self.linear = linear(dim, 2 * dim, rngs, p)
        self.norm = layer_norm(dim, 1e-6, rngs, p, affine=False)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        emb = self.linear(nnx.silu(temb)).astype(jnp.float32)[:, None, :]
        scale, shift = jnp.split(emb, 2, axis=-1)
        return modulate(self.norm(x).astype(jnp.float32), shift, scale).astype(self.dtype)


def modulate(h: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return h * (1 + scale) + shift


def gated_add(x: jax.Array, gate: jax.Array, y: jax.Array) -> jax.Array:
    """``x + gate * y`` in float32, kept in ``x``'s dtype (the scanned carry's)."""
    return (x.astype(jnp.float32) + gate * y.astype(jnp.float32)).astype(x.dtype)


class JointTransformerBlock(nnx.Module):
    """diffusers' ``JointTransformerBlock``. ``__call__((image, text), temb)`` returns the new (image, text);
    a ``context_pre_only`` block (the last) returns (image, None)."""

    def __init__(self, cfg: SD3Config, rngs, p: Precision, *, dual: bool, context_pre_only: bool, impl: str):
        dim = cfg.inner_dim
        self.dtype, self.context_pre_only = p.dtype, context_pre_only
        heads, head_dim, qk = cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm == "rms_norm"
        self.norm1 = AdaLayerNormZero(dim, 9 if dual else 6, rngs, p)
        self.norm1_context = (
            AdaLayerNormContinuous(dim, rngs, p) if context_pre_only else AdaLayerNormZero(dim, 6, rngs, p)
        )
        self.attn = Attention(
            dim, heads, head_dim, rngs, p, qk_norm=qk, joint=True, context_out=not context_pre_only, impl=impl
        )
        self.attn2 = (
            Attention(dim, heads, head_dim, rngs, p, qk_norm=qk, joint=False, context_out=False, impl=impl)
            if dual
            else None
        )
        self.norm2 = layer_norm(dim, 1e-6, rngs, p, affine=False)
        self.ff = FeedForward(dim, rngs, p)
        self.norm2_context = None if context_pre_only else layer_norm(dim, 1e-6, rngs, p, affine=False)
        self.ff_context = None if context_pre_only else FeedForward(dim, rngs, p)

    def __call__(self, carry: tuple[jax.Array, jax.Array], temb: jax.Array):
        x, context = carry
        h, (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, *second) = self.norm1(x, temb)
        if self.context_pre_only:
            context_in = self.norm1_context(context, temb)
        else:
            hc, (c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(
                context, temb
            )
            context_in = modulate(hc, c_shift, c_scale).astype(self.dtype)
        out, context_out = self.attn(modulate(h, shift, scale).astype(self.dtype), context_in)
        x = gated_add(x, gate, out)
        if self.attn2 is not None:  # SD3.5's second self-attention, on the same normalised input
            shift2, scale2, gate2 = second
            x = gated_add(x, gate2, self.attn2(modulate(h, shift2, scale2).astype(self.dtype)))
        ff_in = modulate(self.norm2(x).astype(jnp.float32), shift_mlp, scale_mlp).astype(self.dtype)
        x = gated_add(x, gate_mlp, self.ff(ff_in))
        if self.context_pre_only:
            return x, None
        context = gated_add(context, c_gate, context_out)
        ff_in = modulate(self.norm2_context(context).astype(jnp.float32), c_shift_mlp, c_scale_mlp)
        return x, gated_add(context, c_gate_mlp, self.ff_context(ff_in.astype(self.dtype)))


class MLPEmbedding(nnx.Module):
    """``linear_2(silu(linear_1(x)))``: diffusers' ``TimestepEmbedding`` and ``PixArtAlphaTextProjection``
    (``act_fn="silu"``) alike."""

    def __init__(self, din: int, dim: int, rngs, p: Precision):
        self.linear_1 = linear(din, dim, rngs, p)
        self.linear_2 = linear(dim, dim, rngs, p, axes=("mlp", "embed"))

    def __call__(self, x):
        return self.linear_2(nnx.silu(self.linear_1(x)))


def _sinusoids(timesteps: jax.Array) -> jax.Array:
    return timestep_embedding(timesteps, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0)


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """embed(timesteps) + proj(pooled); with ``delta`` (jdistill's ``timestep_delta_embeds``) plus
    ``timestep_delta_embedder`` on the same sinusoids of ``timestep_delta``."""

    def __init__(self, dim: int, pooled_dim: int, rngs, p: Precision, *, delta: bool = False):
        self.dtype = p.dtype
        self.timestep_embedder = MLPEmbedding(256, dim, rngs, p)
        self.text_embedder = MLPEmbedding(pooled_dim, dim, rngs, p)
        self.timestep_delta_embedder = MLPEmbedding(256, dim, rngs, p) if delta else None

    def __call__(
        self, timesteps: jax.Array, pooled: jax.Array, timestep_delta: jax.Array | None = None
    ) -> jax.Array:
        emb = self.timestep_embedder(_sinusoids(timesteps).astype(self.dtype))
        if self.timestep_delta_embedder is not None:
            if timestep_delta is None:
                raise ValueError(
                    "this SD3 transformer has timestep_delta_embeds: timestep_delta is required (0 for r = t)"
                )
            emb = emb + self.timestep_delta_embedder(_sinusoids(timestep_delta).astype(self.dtype))
        elif timestep_delta is not None:
            raise ValueError(
                "timestep_delta was given, but this SD3 transformer has no timestep_delta_embeds"
            )
        return emb + self.text_embedder(pooled.astype(self.dtype))


# ------------------------------------------------------------------------------------------------ model


class SD3Transformer2DModel(ConfiguredModule):
    """``__call__(sample, timesteps, cond)``: NHWC latents, (B,) or scalar timesteps, ``cond`` with
    ``encoder_hidden_states`` and ``pooled_projections``; returns NHWC (B, H, W, out_channels).
    ``timestep_delta`` (B,) or a scalar, in the units of ``timesteps``: the second time of a model with
    ``timestep_delta_embeds`` (required there, refused otherwise)."""

    def build(self, cfg: SD3Config, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool | str) -> None:
        dim = cfg.inner_dim
        self.dtype, self.remat = p.dtype, remat_policy(remat)  # an unknown policy fails here
        self.pos_embed = PatchEmbed(cfg, rngs, p)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            dim, cfg.pooled_projection_dim, rngs, p, delta=cfg.timestep_delta_embeds
        )
        self.context_embedder = linear(cfg.joint_attention_dim, dim, rngs, p, axes=("mlp", "embed"))

        def block(dual: bool, last: bool):
            return lambda r: JointTransformerBlock(cfg, r, p, dual=dual, context_pre_only=last, impl=impl)

        n_dual, n_plain = cfg.block_runs()
        self.transformer_blocks_dual = (
            Stack(block(True, False), n_dual, rngs, remat=remat) if n_dual else None
        )
        self.transformer_blocks = Stack(block(False, False), n_plain, rngs, remat=remat) if n_plain else None
        self.last_block = block(cfg.num_dual == cfg.num_layers, True)(rngs)
        self.norm_out = AdaLayerNormContinuous(dim, rngs, p)
        self.proj_out = linear(dim, cfg.patch_size**2 * cfg.out_channels, rngs, p, axes=("mlp", "embed"))

    def __call__(
        self, sample: jax.Array, timesteps: jax.Array, cond: dict, *, timestep_delta: jax.Array | None = None
    ) -> jax.Array:
        cfg = self.config
        b, height, width, _ = sample.shape
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
        if timestep_delta is not None:
            timestep_delta = jnp.broadcast_to(jnp.asarray(timestep_delta, jnp.float32), (b,))
        temb = self.time_text_embed(t, cond["pooled_projections"], timestep_delta)
        x = constrain_batch(self.pos_embed(sample))
        context = constrain_batch(self.context_embedder(cond["encoder_hidden_states"].astype(self.dtype)))
        carry = (x, context)
        for stack in (self.transformer_blocks_dual, self.transformer_blocks):
            if stack is not None:
                carry = tuple(constrain_batch(a) for a in stack(carry, temb))
        x, _ = block_caller(self.remat, "attention")(self.last_block, carry, temb)
        x = self.proj_out(self.norm_out(x, temb))
        ps, h, w = cfg.patch_size, height // cfg.patch_size, width // cfg.patch_size
        x = x.reshape(b, h, w, ps, ps, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * ps, w * ps, cfg.out_channels)

    def delta_embedding(self, timestep_delta: jax.Array) -> jax.Array:
        """What ``timestep_delta`` (in the units of ``timesteps``) adds to the conditioning embedding (float32):
        for a fixed delta a constant, which an export folds into ``time_text_embed.text_embedder.linear_2``."""
        embed = self.time_text_embed
        if embed.timestep_delta_embedder is None:
            raise ValueError("this SD3 transformer has no timestep_delta_embeds")
        delta = jnp.asarray(timestep_delta, jnp.float32).reshape(-1)
        return embed.timestep_delta_embedder(_sinusoids(delta).astype(embed.dtype)).astype(jnp.float32)


def sd3_net(
    config: SD3Config, *, precision: Precision = FP32, attention_impl: str = "xla", remat: bool | str = False
) -> Net:
    """The SD3 transformer as a Net; ``net.variant(...)`` builds it with other config fields, and
    ``net.remake(config, dtype=..., param_dtype=..., remat_policy=...)`` with other options (None: these)."""
    return configured_net(
        "transformer",
        SD3Transformer2DModel,
        config,
        precision=precision,
        attention_impl=attention_impl,
        remat=remat,
    )
