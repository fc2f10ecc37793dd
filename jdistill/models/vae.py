"""AutoencoderKL (the Stable Diffusion VAE) in Flax NNX, equal to diffusers' ``AutoencoderKL``.

Attribute names are diffusers' module names (``encoder.down_blocks.0.resnets.0.conv1``,
``decoder.mid_block.attentions.0.to_q``, ``quant_conv`` ...), so every torch key maps to a parameter path
through the generic rules of ``jdistill.convert.core``. Data is NHWC; images are in [-1, 1].

Calling through a ``Net``: ``net.apply(params, x)`` runs the whole autoencoder (encode, posterior mode,
decode); the other methods are reached with ``nnx.merge(net.graphdef, params).encode(x)`` (or
``latents_from_images`` / ``images_from_latents``), which works inside ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.attention import attention, merge_heads, split_heads
from jdistill.models.configured import ConfiguredModule
from jdistill.models.diffusers_config import check_block_types, config_kwargs, field_values, to_json
from jdistill.models.layers import FP32, Precision, block_caller, conv, group_norm, linear
from jdistill.models.net import Net

DOWN_BLOCKS = ("DownEncoderBlock2D",)
UP_BLOCKS = ("UpDecoderBlock2D",)
ACTIVATIONS = ("silu", "swish")  # the same function in diffusers' get_activation
EPS = 1e-6  # every norm of the VAE (resnets, attention, conv_norm_out)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers' ``AutoencoderKL`` config; defaults are diffusers' defaults, so sparse config.json files
    (SD1.5's has no ``scaling_factor`` or ``force_upcast``) read the same here as there."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # Per-channel latent statistics that some pipelines (not the model) apply; jdistill's helpers do not, so a
    # config that sets them is refused rather than silently scaled the wrong way.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # Whether diffusers runs this VAE in float32 whatever the pipeline dtype; recorded for callers choosing a
    # Precision, not applied here.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderKLConfig:
        """From a diffusers ``vae/config.json`` dict; bookkeeping keys (``_class_name`` ...) are ignored."""
        cfg = cls(**config_kwargs(cls, d))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return to_json(field_values(self))

    def validate(self) -> None:
        check_block_types("VAE", self.down_block_types, self.up_block_types, DOWN_BLOCKS, UP_BLOCKS)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"VAE config has {n} block_out_channels but {len(self.down_block_types)} down and "
                f"{len(self.up_block_types)} up blocks"
            )
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn {self.act_fn!r} is not supported ({ACTIVATIONS})")
        if self.latents_mean is not None or self.latents_std is not None:
            raise ValueError("VAE configs with latents_mean / latents_std are not supported")

    @property
    def shift(self) -> float:
        return 0.0 if self.shift_factor is None else float(self.shift_factor)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# ------------------------------------------------------------------------------------------------ posterior


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """diffusers' ``DiagonalGaussianDistribution`` in NHWC; a pytree, so it can leave a jitted function."""

    mean: jax.Array
    logvar: jax.Array  # already clamped to LOGVAR_RANGE

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL to the standard normal, summed over all but the batch axis (diffusers' ``kl()``)."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# ------------------------------------------------------------------------------------------------ layers


class ResnetBlock2D(nnx.Module):
    """diffusers' ResnetBlock2D without a time embedding (temb_channels=None), as the VAE uses it."""

    def __init__(self, cin: int, cout: int, groups: int, rngs: nnx.Rngs, p: Precision):
        self.dtype = p.dtype
        self.norm1 = group_norm(groups, cin, EPS, rngs, p)
        self.conv1 = conv(cin, cout, 3, rngs, p, padding=1)
        self.norm2 = group_norm(groups, cout, EPS, rngs, p)
        self.conv2 = conv(cout, cout, 3, rngs, p, padding=1)
        self.conv_shortcut = conv(cin, cout, 1, rngs, p) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)).astype(self.dtype))
        h = self.conv2(nnx.silu(self.norm2(h)).astype(self.dtype))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right only (diffusers' padding=0 path,
    ``F.pad(x, (0, 1, 0, 1))``), which differs from the UNet's symmetric padding=1."""

    def __init__(self, channels: int, rngs: nnx.Rngs, p: Precision):
        self.conv = conv(channels, channels, 3, rngs, p, stride=2, padding=0)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs, p: Precision):
        self.conv = conv(channels, channels, 3, rngs, p, padding=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))  # nearest x2


class Attention(nnx.Module):
    """The mid-block self-attention (diffusers' ``Attention`` built from the deprecated AttentionBlock):
    group norm, biased q/k/v/out projections, residual connection, ``rescale_output_factor``."""

    def __init__(
        self,
        channels: int,
        groups: int,
        rngs: nnx.Rngs,
        p: Precision,
        *,
        head_dim: int | None = None,
        rescale_output_factor: float = 1.0,
        impl: str = "xla",
    ):
        head_dim = head_dim or channels  # the VAE passes attention_head_dim=channels: one head
        self.heads, self.impl, self.dtype = channels // head_dim, impl, p.dtype
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = group_norm(groups, channels, EPS, rngs, p)
        self.to_q = linear(channels, channels, rngs, p, axes=("embed", "heads"))
        self.to_k = linear(channels, channels, rngs, p, axes=("embed", "heads"))
        self.to_v = linear(channels, channels, rngs, p, axes=("embed", "heads"))
        self.to_out = nnx.List([linear(channels, channels, rngs, p, axes=("heads", "embed"))])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.group_norm(x).astype(self.dtype).reshape(b, h * w, c)
        q, k, v = (split_heads(f(y), self.heads) for f in (self.to_q, self.to_k, self.to_v))
        # diffusers declares upcast_softmax for this block; a float32 softmax over h*w tokens also keeps
        # bf16 runs stable at high resolution.
        out = self.to_out[0](merge_heads(attention(q, k, v, impl=self.impl, upcast=True)))
        return (out.reshape(b, h, w, c) + x) / self.rescale_output_factor


def _caller(remat: bool | str) -> Callable:
    """Call a sub-module under the remat policy (``layers.block_caller``; the VAE's blocks count as resnets)."""
    return block_caller(remat, "resnet")


# ------------------------------------------------------------------------------------------------ blocks


class ResnetBlocks2D(nnx.Module):
    """diffusers' ``DownEncoderBlock2D`` (``resample="down"``) and ``UpDecoderBlock2D`` (``"up"``): ``n`` resnets,
    the first from ``cin`` channels, then the resampler (none with ``resample=None``) under diffusers' key,
    ``downsamplers`` or ``upsamplers``; the other key stays None, which holds no parameters."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: str | None, rngs, p: Precision):
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, rngs, p) for i in range(n)]
        )
        self.downsamplers = nnx.List([Downsample2D(cout, rngs, p)]) if resample == "down" else None
        self.upsamplers = nnx.List([Upsample2D(cout, rngs, p)]) if resample == "up" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for samplers in (self.downsamplers, self.upsamplers):
            if samplers is not None:
                x = samplers[0](x)
        return x


def _blocks(channels: tuple[int, ...], n: int, groups: int, resample: str, rngs, p: Precision) -> nnx.List:
    """One ``ResnetBlocks2D`` per width in ``channels``, each from the previous width; all but the last resample."""
    last = len(channels) - 1
    return nnx.List(
        [
            ResnetBlocks2D(channels[max(i - 1, 0)], c, n, groups, resample if i < last else None, rngs, p)
            for i, c in enumerate(channels)
        ]
    )


class UNetMidBlock2D(nnx.Module):
    """resnet, attention (optional), resnet; diffusers keeps ``attentions`` as ``[None]`` without attention,
    which holds no parameters, so ``None`` here gives the same keys."""

    def __init__(self, channels: int, groups: int, add_attention: bool, rngs, p: Precision, impl: str):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, rngs, p) for _ in range(2)])
        self.attentions = (
            nnx.List([Attention(channels, groups, rngs, p, impl=impl)]) if add_attention else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool):
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
        self.dtype, self.remat = p.dtype, remat
        self.conv_in = conv(cfg.in_channels, ch[0], 3, rngs, p, padding=1)
        self.down_blocks = _blocks(ch, n, g, "down", rngs, p)
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention, rngs, p, impl)
        self.conv_norm_out = group_norm(g, ch[-1], EPS, rngs, p)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, rngs, p, padding=1)  # double_z: mean, logvar

    def __call__(self, x: jax.Array) -> jax.Array:
        call = _caller(self.remat)
        x = self.conv_in(x.astype(self.dtype))
        for block in self.down_blocks:
            x = call(block, x)
        x = call(self.mid_block, x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)).astype(self.dtype))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool):
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.layers_per_block + 1
        self.dtype, self.remat = p.dtype, remat
        self.conv_in = conv(cfg.latent_channels, ch[0], 3, rngs, p, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], g, cfg.mid_block_add_attention, rngs, p, impl)
        self.up_blocks = _blocks(ch, n, g, "up", rngs, p)
        self.conv_norm_out = group_norm(g, ch[-1], EPS, rngs, p)
        self.conv_out = conv(ch[-1], cfg.out_channels, 3, rngs, p, padding=1)

    def __call__(self, z: jax.Array) -> jax.Array:
        call = _caller(self.remat)
        x = self.conv_in(z.astype(self.dtype))
        x = call(self.mid_block, x)
        for block in self.up_blocks:
            x = call(block, x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)).astype(self.dtype))


# ------------------------------------------------------------------------------------------------ model


class AutoencoderKL(ConfiguredModule):
    """``encode(x) -> DiagonalGaussian`` and ``decode(z)`` on NHWC arrays; outputs are float32 whatever the
    compute dtype (images and latents are small, and callers compare or scale them)."""

    def build(
        self, cfg: AutoencoderKLConfig, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool | str
    ) -> None:
        self.dtype = p.dtype
        self.encoder = Encoder(cfg, rngs, p, impl, remat)
        self.decoder = Decoder(cfg, rngs, p, impl, remat)
        lat = cfg.latent_channels
        self.quant_conv = conv(2 * lat, 2 * lat, 1, rngs, p) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, 1, rngs, p) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images (B, H, W, in_channels) in [-1, 1] -> posterior over unscaled latents (B, H/f, W/f, C)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """diffusers' ``forward``: reconstruct from the posterior mode, or from a sample when given a key."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

    def latents_from_images(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Diffusion-space latents ``(z - shift_factor) * scaling_factor``: z the posterior mean, or a sample
        when a key is given (diffusers' training scripts use ``latent_dist.sample()``)."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return (z - self.config.shift) * self.config.scaling_factor

    def images_from_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse scaling (``latents / scaling_factor + shift_factor``, as diffusers' pipelines) and decode."""
        return self.decode(latents.astype(jnp.float32) / self.config.scaling_factor + self.config.shift)


def vae_net(
    config: AutoencoderKLConfig,
    *,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool = False,
) -> Net:
    return Net(
        "vae",
        lambda rngs: AutoencoderKL(
            config, rngs=rngs, precision=precision, attention_impl=attention_impl, remat=remat
        ),
        config=config,
    )
