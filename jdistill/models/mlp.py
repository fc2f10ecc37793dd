"""Small time- and class-conditioned MLPs: students, fake scores, discriminators and denoisers on toy data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.embeddings import timestep_embedding
from jdistill.models.net import sharding_metadata


def fourier_encode(x: jax.Array, num: int) -> jax.Array:
    """[x, sin(2^k x), cos(2^k x)] for k < num: lets a small MLP resolve sharp features of low-dim inputs."""
    if num == 0:
        return x
    freqs = 2.0 ** jnp.arange(num, dtype=jnp.float32)
    angles = (x[..., None] * freqs).reshape(*x.shape[:-1], -1)
    return jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ResidualBlock(nnx.Module):
    def __init__(self, width: int, hidden: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, hidden, kernel_metadata=sharding_metadata("embed", "mlp"), rngs=rngs)
        self.fc2 = nnx.Linear(
            hidden,
            width,
            kernel_metadata=sharding_metadata("mlp", "embed"),
            kernel_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )

    def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:
        return h + self.fc2(nnx.silu(self.fc1(self.norm(h) + emb)))


class TimeMLP(nnx.Module):
    """f(x, t, cond) -> R^data_dim for flat data (B, data_dim).

    ``t`` is the network time of the teacher's schedule (0..999 for VP, 1000 t for flow); ``time_scale``
    brings it to the range the sinusoidal embedding expects. ``label`` is an int class id, with id
    ``num_classes`` reserved for "no condition" (classifier-free guidance). ``zero_out`` starts the network
    at exactly zero output (used for residual fake scores that begin equal to the teacher).

    ``cond`` is the label, or a dict with "label" and the optional inputs of students that take more than a
    time: "timestep_cond" (B, time_cond_proj_dim), projected without bias and added to the time embedding's
    input as in diffusers' UNet (LCM's guidance embedding), and "time_delta" (B,), a second time embedded
    like the first (MeanFlow's t - r), in the same units as t.
    """

    def __init__(
        self,
        data_dim: int,
        num_classes: int,
        *,
        width: int = 128,
        depth: int = 3,
        hidden: int = 256,
        time_embed_dim: int = 64,
        time_scale: float = 1.0,
        out_dim: int | None = None,
        zero_out: bool = False,
        fourier_features: int = 0,
        time_cond_proj_dim: int = 0,
        second_time: bool = False,
        rngs: nnx.Rngs,
    ):
        self.time_embed_dim = time_embed_dim
        self.time_scale = time_scale
        self.fourier_features = fourier_features
        self.embed_in = nnx.Linear(
            data_dim * (1 + 2 * fourier_features),
            width,
            kernel_metadata=sharding_metadata(None, "embed"),
            rngs=rngs,
        )
        self.time_fc1 = nnx.Linear(
            time_embed_dim, width, kernel_metadata=sharding_metadata(None, "embed"), rngs=rngs
        )
        self.time_fc2 = nnx.Linear(width, width, kernel_metadata=sharding_metadata("embed", None), rngs=rngs)
        self.cond_proj = (
            nnx.Linear(time_cond_proj_dim, time_embed_dim, use_bias=False, rngs=rngs)
            if time_cond_proj_dim
            else None
        )
        self.delta_fc = (
            nnx.Linear(time_embed_dim, width, kernel_metadata=sharding_metadata(None, "embed"), rngs=rngs)
            if second_time
            else None
        )
        self.label_embed = nnx.Embed(num_classes + 1, width, rngs=rngs)
        self.blocks = nnx.List([ResidualBlock(width, hidden, rngs) for _ in range(depth)])
        self.norm_out = nnx.LayerNorm(width, rngs=rngs)
        out_init = nnx.initializers.zeros_init() if zero_out else nnx.initializers.lecun_normal()
        self.out = nnx.Linear(
            width,
            out_dim or data_dim,
            kernel_init=out_init,
            kernel_metadata=sharding_metadata("embed", None),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, t: jax.Array, cond, *, return_mid: bool = False, mid_only: bool = False):
        """The output, and with ``return_mid`` also the last hidden features (B, width) (a GAN trunk); with
        ``mid_only`` those features alone."""
        extra = cond if isinstance(cond, dict) else {"label": cond}
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1]) * self.time_scale
        tin = timestep_embedding(t, self.time_embed_dim)
        if "timestep_cond" in extra:
            if self.cond_proj is None:
                raise ValueError("a timestep condition was given, but the MLP has no time_cond_proj_dim")
            tin = tin + self.cond_proj(extra["timestep_cond"].astype(jnp.float32))
        hidden = self.time_fc1(tin)
        if self.delta_fc is not None:
            delta = jnp.broadcast_to(jnp.asarray(extra["time_delta"], jnp.float32), x.shape[:1])
            hidden = hidden + self.delta_fc(timestep_embedding(delta * self.time_scale, self.time_embed_dim))
        temb = self.time_fc2(nnx.silu(hidden))
        emb = temb + self.label_embed(extra["label"])
        h = self.embed_in(fourier_encode(x, self.fourier_features))
        for block in self.blocks:
            h = block(h, emb)
        if mid_only:
            return h
        out = self.out(nnx.silu(self.norm_out(h)))
        return (out, h) if return_mid else out
