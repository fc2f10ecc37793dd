"""diffusers' ``FeedForward`` in Flax NNX, shared by the UNet (GEGLU) and the SD3 and FLUX transformers (tanh GELU).

Attribute names follow diffusers' checkpoints: ``net.0.proj`` (the activation's input projection), ``net.1``
(dropout, no parameters) and ``net.2`` (the output projection).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.layers import Precision, linear


class GELU(nnx.Module):
    """diffusers' GELU(approximate="tanh"): projection then the tanh-approximated gelu."""

    def __init__(self, dim: int, inner: int, rngs: nnx.Rngs, p: Precision):
        self.proj = linear(dim, inner, rngs, p)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


class GEGLU(nnx.Module):
    """diffusers' GEGLU: one projection to twice the width, the second half an exact-gelu gate on the first."""

    def __init__(self, dim: int, inner: int, rngs: nnx.Rngs, p: Precision):
        self.proj = linear(dim, inner * 2, rngs, p)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``net.0`` = ``activation`` (GELU or GEGLU) projection, ``net.1`` = dropout (no parameters), ``net.2`` =
    output projection; the hidden width is ``mult * dim``."""

    def __init__(self, dim: int, rngs: nnx.Rngs, p: Precision, *, activation: type = GELU, mult: int = 4):
        inner = dim * mult
        self.net = nnx.List(
            [
                activation(dim, inner, rngs, p),
                nnx.Dropout(0.0),
                linear(inner, dim, rngs, p, axes=("mlp", "embed")),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))
