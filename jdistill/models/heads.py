"""Discriminator heads on a network's bottleneck features (diffusion GANs whose trunk is the fake score).

DMD2 puts a small classifier on the fake UNet's mid-block output (SD1.5: strided 4x4 convolutions with group
norm and SiLU, then a 1x1 convolution to one logit); SiDA and few-step SiD use the fake network's encoder the
same way. Spatial features (B, H, W, C) go through ``num_down`` stride-2 convolutions and a 1x1 convolution,
and the per-location logits are averaged into one logit per sample; flat features (B, C) (the toy MLPs) go
through a small MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.embeddings import timestep_embedding
from jdistill.models.layers import FP32, conv, group_norm, linear


class DiscriminatorHead(nnx.Module):
    def __init__(self, feature_shape: tuple[int, ...], *, hidden: int = 0, num_down: int = 2, rngs: nnx.Rngs):
        channels = feature_shape[-1]
        hidden = hidden or channels
        self.spatial = len(feature_shape) == 3
        if self.spatial:
            groups = _groups(hidden)
            layers = []
            for i in range(num_down):
                layers.append(
                    conv(channels if i == 0 else hidden, hidden, 4, rngs, FP32, stride=2, padding=1)
                )
                layers.append(group_norm(groups, hidden, 1e-5, rngs, FP32))
            self.layers = nnx.List(layers)
            self.out = conv(hidden if num_down else channels, 1, 1, rngs, FP32)
        elif len(feature_shape) == 1:
            self.layers = nnx.List(
                [
                    linear(channels, hidden, rngs, FP32),
                    linear(hidden, hidden, rngs, FP32, axes=("mlp", "embed")),
                ]
            )
            self.out = linear(hidden, 1, rngs, FP32, axes=("embed", None))
        else:
            raise ValueError(f"discriminator features must be (C,) or (H, W, C), got {feature_shape}")

    def __call__(self, features: jax.Array) -> jax.Array:
        """One float32 logit per sample: the mean of ``logit_map``."""
        logits = self.logit_map(features)
        return jnp.mean(logits.reshape(logits.shape[0], -1), axis=1)

    def logit_map(self, features: jax.Array) -> jax.Array:
        """Float32 logits per location (B, H', W'), or (B, 1) for flat features."""
        h = features.astype(jnp.float32)
        if self.spatial:
            for i in range(0, len(self.layers), 2):
                h = nnx.silu(self.layers[i + 1](self.layers[i](h)))
            return self.out(h)[..., 0]
        for layer in self.layers:
            h = nnx.silu(layer(h))
        return self.out(h)


class DiscriminatorHeads(nnx.Module):
    """One ``DiscriminatorHead`` per feature map of a trunk (LADD: heads on several layers of the frozen
    teacher). The call returns every head's per-location logits side by side, (B, sum of locations), so that
    a GAN loss is taken per location as in SANA-Sprint's heads."""

    def __init__(
        self, feature_shapes: Sequence[tuple[int, ...]], *, hidden: int = 0, num_down: int = 2, rngs: nnx.Rngs
    ):
        self.heads = nnx.List(
            [DiscriminatorHead(tuple(s), hidden=hidden, num_down=num_down, rngs=rngs) for s in feature_shapes]
        )

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(self.heads)} discriminator heads got {len(features)} feature maps")
        maps = [head.logit_map(f) for head, f in zip(self.heads, features, strict=True)]
        return jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1)


def _groups(channels: int) -> int:
    """32 groups as DMD2's head, fewer when the channel count does not divide (tiny test models)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class LogVarHead(nnx.Module):
    """sCM's adaptive loss weighting: a learned log-variance w(t), linear on a sinusoidal embedding of t."""

    def __init__(self, *, time_embed_dim: int = 128, time_scale: float = 1.0, rngs: nnx.Rngs):
        self.time_embed_dim = time_embed_dim
        self.time_scale = time_scale
        self.out = nnx.Linear(time_embed_dim, 1, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        t = jnp.asarray(t, jnp.float32).reshape(-1) * self.time_scale
        return self.out(timestep_embedding(t, self.time_embed_dim))[:, 0]
