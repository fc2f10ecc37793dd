"""UNet2DConditionModel in Flax NNX, equal to diffusers' for the options SD1.x, SD2.x and SDXL use.

Attribute names are diffusers' module names, so every torch key maps to a parameter path through the generic
rules of ``jdistill.convert.core`` (no per-layer table). Data is NHWC; ``encoder_hidden_states`` is (B, T, D).

Supported: per-block heads (diffusers' ``attention_head_dim`` is the number of heads, a naming quirk kept for
config compatibility), ``use_linear_projection``, per-block (and per-layer) ``transformer_layers_per_block``,
``addition_embed_type="text_time"`` (SDXL), ``time_cond_proj_dim`` (LCM's guidance embedding),
``upcast_attention``, optional bottleneck (mid-block) features, attention implementation, remat per block,
and a dtype policy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.attention import attention, merge_heads, split_heads
from jdistill.models.configured import ConfiguredModule, configured_net
from jdistill.models.diffusers_config import check_block_types, config_kwargs, field_values, to_json
from jdistill.models.embeddings import timestep_embedding
from jdistill.models.feedforward import GEGLU, FeedForward
from jdistill.models.layers import (
    FP32,
    Precision,
    block_caller,
    conv,
    group_norm,
    layer_norm,
    linear,
    remat_policy,
)
from jdistill.models.net import Net
from jdistill.parallel import constrain_batch

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


# Options of diffusers' config that jdistill does not implement; a config using them is refused.
UNSUPPORTED_OPTIONS = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "timestep_post_act": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "addition_embed_type_num_heads": 64,
    "dropout": 0.0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: Any = 1  # int, per block, or per block and layer
    reverse_transformer_layers_per_block: Any = None
    attention_head_dim: Any = 8  # number of heads (diffusers' naming), int or per block
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_cond_proj_dim: int | None = None
    act_fn: str = "silu"
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    center_input_sample: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """From a diffusers ``unet/config.json`` dict; unknown bookkeeping keys are ignored."""
        for key, default in UNSUPPORTED_OPTIONS.items():
            value = d.get(key, default)
            if isinstance(value, list):
                value = tuple(value)
            if key in d and value != default and not (key == "only_cross_attention" and not any_true(value)):
                raise ValueError(f"UNet config {key}={d[key]!r} is not supported (only {default!r})")
        kwargs = config_kwargs(cls, d)
        for k in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
            if isinstance(kwargs.get(k), tuple):
                kwargs[k] = tuple(tuple(x) if isinstance(x, list) else x for x in kwargs[k])
        if kwargs.get("upcast_attention") is None:  # SDXL's config has null
            kwargs["upcast_attention"] = False
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return to_json({**field_values(self), **UNSUPPORTED_OPTIONS})

    def validate(self) -> None:
        check_block_types("UNet", self.down_block_types, self.up_block_types, DOWN_BLOCKS, UP_BLOCKS)
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"unsupported mid block {self.mid_block_type!r}")
        if self.num_attention_heads is not None:
            raise ValueError("set attention_head_dim (diffusers' number of heads), not num_attention_heads")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"addition_embed_type {self.addition_embed_type!r} is not supported (None, 'text_time')"
            )
        if self.act_fn != "silu":
            raise ValueError(f"act_fn {self.act_fn!r} is not supported (silu)")

    def per_block(self, value) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.down_block_types)


def any_true(value) -> bool:
    return any(value) if isinstance(value, (tuple, list)) else bool(value)


# ------------------------------------------------------------------------------------------------ layers


class Attention(nnx.Module):
    """diffusers' Attention with bias-free q/k/v and a biased output projection (``to_out.0``)."""

    def __init__(self, dim, context_dim, heads, head_dim, rngs, p: Precision, *, upcast=False, impl="xla"):
        inner = heads * head_dim
        self.heads, self.upcast, self.impl = heads, upcast, impl
        self.to_q = linear(dim, inner, rngs, p, bias=False, axes=("embed", "heads"))
        self.to_k = linear(context_dim, inner, rngs, p, bias=False, axes=("embed", "heads"))
        self.to_v = linear(context_dim, inner, rngs, p, bias=False, axes=("embed", "heads"))
        self.to_out = nnx.List([linear(inner, dim, rngs, p, axes=("heads", "embed"))])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        q, k, v = (
            split_heads(f(y), self.heads)
            for f, y in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        return self.to_out[0](merge_heads(attention(q, k, v, impl=self.impl, upcast=self.upcast)))


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim, context_dim, heads, head_dim, rngs, p: Precision, *, upcast=False, impl="xla"):
        self.norm1 = layer_norm(dim, 1e-5, rngs, p)
        self.attn1 = Attention(dim, dim, heads, head_dim, rngs, p, upcast=upcast, impl=impl)
        self.norm2 = layer_norm(dim, 1e-5, rngs, p)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, rngs, p, upcast=upcast, impl=impl)
        self.norm3 = layer_norm(dim, 1e-5, rngs, p)
        self.ff = FeedForward(dim, rngs, p, activation=GEGLU)
        self.dtype = p.dtype

    def __call__(self, x, context):
        x = self.attn1(self.norm1(x).astype(self.dtype)) + x
        x = self.attn2(self.norm2(x).astype(self.dtype), context) + x
        return self.ff(self.norm3(x).astype(self.dtype)) + x


class Transformer2DModel(nnx.Module):
    def __init__(
        self, channels, context_dim, heads, depth, groups, rngs, p: Precision, *, linear_proj, upcast, impl
    ):
        head_dim = channels // heads
        self.linear_proj, self.dtype = linear_proj, p.dtype
        self.norm = group_norm(groups, channels, 1e-6, rngs, p)
        make_proj = (
            (lambda: linear(channels, channels, rngs, p))
            if linear_proj
            else (lambda: conv(channels, channels, 1, rngs, p))
        )
        self.proj_in = make_proj()
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    channels, context_dim, heads, head_dim, rngs, p, upcast=upcast, impl=impl
                )
                for _ in range(depth)
            ]
        )
        self.proj_out = make_proj()

    def __call__(self, x, context):
        b, h, w, c = x.shape
        residual = x
        x = self.norm(x).astype(self.dtype)
        x = self.proj_in(x.reshape(b, h * w, c)) if self.linear_proj else self.proj_in(x).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x).reshape(b, h, w, c) if self.linear_proj else self.proj_out(x.reshape(b, h, w, c))
        return x + residual


class ResnetBlock2D(nnx.Module):
    def __init__(self, cin, cout, temb_dim, groups, eps, rngs, p: Precision):
        self.dtype = p.dtype
        self.norm1 = group_norm(groups, cin, eps, rngs, p)
        self.conv1 = conv(cin, cout, 3, rngs, p, padding=1)
        self.time_emb_proj = linear(temb_dim, cout, rngs, p, axes=("embed", "conv_out"))
        self.norm2 = group_norm(groups, cout, eps, rngs, p)
        self.conv2 = conv(cout, cout, 3, rngs, p, padding=1)
        self.conv_shortcut = conv(cin, cout, 1, rngs, p) if cin != cout else None

    def __call__(self, x, temb):
        h = self.conv1(nnx.silu(self.norm1(x)).astype(self.dtype))
        h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)).astype(self.dtype))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nnx.Module):
    def __init__(self, channels, rngs, p: Precision):
        self.conv = conv(channels, channels, 3, rngs, p, stride=2, padding=1)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, channels, rngs, p: Precision):
        self.conv = conv(channels, channels, 3, rngs, p, padding=1)

    def __call__(self, x, size: tuple[int, int] | None = None):
        if size is None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # odd skip sizes: nearest resize to the skip connection's size, as diffusers does
            x = jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method="nearest")
        return self.conv(x)


# ------------------------------------------------------------------------------------------------ blocks


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    kind: str
    cin: int
    cout: int
    prev: int  # up blocks: channels coming from below
    heads: int
    depths: tuple[int, ...]
    add_sample: bool


def _resnets(cins: list[int], cout: int, cfg: UNetConfig, temb_dim: int, rngs, p: Precision) -> nnx.List:
    """One resnet per input width in ``cins``, each to ``cout`` channels."""
    return nnx.List(
        [ResnetBlock2D(cin, cout, temb_dim, cfg.norm_num_groups, cfg.norm_eps, rngs, p) for cin in cins]
    )


def _transformer(
    channels: int, heads: int, depth: int, cfg: UNetConfig, rngs, p: Precision, impl: str
) -> Transformer2DModel:
    return Transformer2DModel(
        channels,
        cfg.cross_attention_dim,
        heads,
        depth,
        cfg.norm_num_groups,
        rngs,
        p,
        linear_proj=cfg.use_linear_projection,
        upcast=cfg.upcast_attention,
        impl=impl,
    )


def _attentions(spec: _BlockSpec, cfg: UNetConfig, n: int, rngs, p: Precision, impl: str) -> nnx.List | None:
    """The transformer after each of a cross-attention block's ``n`` resnets; None for a block without
    (DownBlock2D, UpBlock2D)."""
    if not spec.kind.startswith("CrossAttn"):
        return None
    return nnx.List(
        [_transformer(spec.cout, spec.heads, spec.depths[i], cfg, rngs, p, impl) for i in range(n)]
    )


class DownBlock(nnx.Module):
    """CrossAttnDownBlock2D (with attentions) or DownBlock2D."""

    def __init__(
        self,
        spec: _BlockSpec,
        cfg: UNetConfig,
        temb_dim: int,
        rngs,
        p: Precision,
        impl: str,
        remat: bool | str,
    ):
        self.remat = remat
        n = cfg.layers_per_block
        self.resnets = _resnets([spec.cin] + [spec.cout] * (n - 1), spec.cout, cfg, temb_dim, rngs, p)
        self.attentions = _attentions(spec, cfg, n, rngs, p, impl)
        self.downsamplers = nnx.List([Downsample2D(spec.cout, rngs, p)]) if spec.add_sample else None

    def __call__(self, x, temb, context):
        call, attend = block_caller(self.remat, "resnet"), block_caller(self.remat, "attention")
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = call(resnet, x, temb)
            if self.attentions is not None:
                x = attend(self.attentions[i], x, context)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class UpBlock(nnx.Module):
    """CrossAttnUpBlock2D (with attentions) or UpBlock2D; consumes skip connections from the down path."""

    def __init__(
        self,
        spec: _BlockSpec,
        cfg: UNetConfig,
        temb_dim: int,
        rngs,
        p: Precision,
        impl: str,
        remat: bool | str,
    ):
        self.remat = remat
        n = cfg.layers_per_block + 1
        # Each resnet's input: the path from below (``prev`` channels for the first, ``cout`` after) concatenated
        # with a skip from the down path (``cin`` channels for the last, ``cout`` before).
        cins = [
            (spec.prev if i == 0 else spec.cout) + (spec.cin if i == n - 1 else spec.cout) for i in range(n)
        ]
        self.resnets = _resnets(cins, spec.cout, cfg, temb_dim, rngs, p)
        self.attentions = _attentions(spec, cfg, n, rngs, p, impl)
        self.upsamplers = nnx.List([Upsample2D(spec.cout, rngs, p)]) if spec.add_sample else None

    def __call__(self, x, skips: list, temb, context, upsample_size=None):
        call, attend = block_caller(self.remat, "resnet"), block_caller(self.remat, "attention")
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = call(resnet, x, temb)
            if self.attentions is not None:
                x = attend(self.attentions[i], x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(self, channels, heads, depth, cfg: UNetConfig, temb_dim, rngs, p: Precision, impl, remat):
        self.remat = remat
        self.resnets = _resnets([channels, channels], channels, cfg, temb_dim, rngs, p)
        self.attentions = nnx.List([_transformer(channels, heads, depth, cfg, rngs, p, impl)])

    def __call__(self, x, temb, context):
        call, attend = block_caller(self.remat, "resnet"), block_caller(self.remat, "attention")
        x = call(self.resnets[0], x, temb)
        x = attend(self.attentions[0], x, context)
        return call(self.resnets[1], x, temb)


class TimestepEmbedding(nnx.Module):
    def __init__(self, din, dim, rngs, p: Precision, cond_dim: int | None = None):
        self.linear_1 = linear(din, dim, rngs, p)
        self.linear_2 = linear(dim, dim, rngs, p, axes=("mlp", "embed"))
        self.cond_proj = (
            linear(cond_dim, din, rngs, p, bias=False, axes=(None, "embed")) if cond_dim else None
        )

    def __call__(self, x, cond=None):
        if cond is not None:
            if self.cond_proj is None:
                raise ValueError("a timestep condition was given, but the UNet has no time_cond_proj_dim")
            x = x + self.cond_proj(cond)
        return self.linear_2(nnx.silu(self.linear_1(x)))


# ------------------------------------------------------------------------------------------------ model


def _layer_depths(value, n_blocks: int, n_layers: int) -> list[tuple[int, ...]]:
    per_block = value if isinstance(value, (tuple, list)) else (value,) * n_blocks
    return [tuple(d) if isinstance(d, (tuple, list)) else (d,) * n_layers for d in per_block]


class UNet2DConditionModel(ConfiguredModule):
    """``__call__(sample, timesteps, cond)`` with ``cond`` a dict: ``encoder_hidden_states`` (B, T, D), and for
    SDXL ``text_embeds`` (B, P) and ``time_ids`` (B, 6); optionally ``timestep_cond`` (LCM's w embedding)."""

    def build(self, cfg: UNetConfig, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool | str) -> None:
        remat = remat_policy(remat)  # an unknown policy fails here, not at the first call
        self.dtype = p.dtype
        ch = cfg.block_out_channels
        n_blocks = len(ch)
        heads = cfg.per_block(cfg.attention_head_dim)
        time_dim = ch[0] * 4
        self.conv_in = conv(cfg.in_channels, ch[0], 3, rngs, p, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], time_dim, rngs, p, cfg.time_cond_proj_dim)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(
                cfg.projection_class_embeddings_input_dim, time_dim, rngs, p
            )
        else:
            self.add_embedding = None

        down_depths = _layer_depths(cfg.transformer_layers_per_block, n_blocks, cfg.layers_per_block)
        down = []
        for i, kind in enumerate(cfg.down_block_types):
            spec = _BlockSpec(kind, ch[max(i - 1, 0)], ch[i], 0, heads[i], down_depths[i], i < n_blocks - 1)
            down.append(DownBlock(spec, cfg, time_dim, rngs, p, impl, remat))
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock2DCrossAttn(
            ch[-1], heads[-1], down_depths[-1][0], cfg, time_dim, rngs, p, impl, remat
        )

        rch, rheads = ch[::-1], heads[::-1]
        if cfg.reverse_transformer_layers_per_block is not None:
            up_depths = _layer_depths(
                cfg.reverse_transformer_layers_per_block, n_blocks, cfg.layers_per_block + 1
            )
        else:
            up_depths = _layer_depths(
                tuple(reversed(cfg.per_block(cfg.transformer_layers_per_block))),
                n_blocks,
                cfg.layers_per_block + 1,
            )
        up = []
        for i, kind in enumerate(cfg.up_block_types):
            spec = _BlockSpec(
                kind,
                rch[min(i + 1, n_blocks - 1)],
                rch[i],
                rch[max(i - 1, 0)],
                rheads[i],
                up_depths[i],
                i < n_blocks - 1,
            )
            up.append(UpBlock(spec, cfg, time_dim, rngs, p, impl, remat))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = group_norm(cfg.norm_num_groups, ch[0], cfg.norm_eps, rngs, p)
        self.conv_out = conv(ch[0], cfg.out_channels, 3, rngs, p, padding=1)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        cond: dict,
        *,
        return_mid: bool = False,
        return_features: bool = False,
        mid_only: bool = False,
    ):
        """The output; with ``return_mid`` also the mid block's output (a GAN trunk), with ``return_features``
        also every down block's output and then the mid block's (LADD's discriminator taps); with
        ``mid_only`` the mid block's output alone (the up path is not built)."""
        cfg = self.config
        b = sample.shape[0]
        context = cond["encoder_hidden_states"].astype(self.dtype)
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
        t_emb = timestep_embedding(
            t,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            downscale_freq_shift=cfg.freq_shift,
        )
        t_cond = cond.get("timestep_cond")
        emb = self.time_embedding(
            t_emb.astype(self.dtype), None if t_cond is None else t_cond.astype(self.dtype)
        )
        if self.add_embedding is not None:
            time_ids = jnp.asarray(cond["time_ids"], jnp.float32)
            time_embeds = timestep_embedding(
                time_ids.reshape(-1),
                cfg.addition_time_embed_dim,
                flip_sin_to_cos=cfg.flip_sin_to_cos,
                downscale_freq_shift=cfg.freq_shift,
            ).reshape(b, -1)
            add = jnp.concatenate([cond["text_embeds"].astype(jnp.float32), time_embeds], axis=-1)
            emb = emb + self.add_embedding(add.astype(self.dtype))

        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = constrain_batch(self.conv_in(x))
        skips, features = [x], []
        for block in self.down_blocks:
            x, outs = block(x, emb, context)
            x = constrain_batch(x)
            skips.extend(outs)
            features.append(x)
        x = constrain_batch(self.mid_block(x, emb, context))
        mid = x
        if mid_only:
            return mid
        features.append(mid)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = None
            if skips and (skips[-1].shape[1] != 2 * x.shape[1] or skips[-1].shape[2] != 2 * x.shape[2]):
                size = skips[-1].shape[1:3]
            x = constrain_batch(block(x, block_skips, emb, context, size))
        x = self.conv_out(nnx.silu(self.conv_norm_out(x)).astype(self.dtype))
        if return_features:
            return x, tuple(features)
        return (x, mid) if return_mid else x


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def unet_net(
    config: UNetConfig, *, precision: Precision = FP32, attention_impl="xla", remat: bool | str = False
) -> Net:
    """The UNet as a Net; ``net.variant(time_cond_proj_dim=256)`` builds it with other config fields, and
    ``net.remake(config, dtype=..., param_dtype=..., remat=...)`` with other options (None: these)."""
    return configured_net(
        "unet", UNet2DConditionModel, config, precision=precision, attention_impl=attention_impl, remat=remat
    )
