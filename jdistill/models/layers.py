"""Layer constructors shared by the converted models, with the dtype policy and sharding names.

Every model takes ``dtype`` (computation) and ``param_dtype`` (storage); parameters carry logical axis names
for the sharding rules: "embed" for model-width dimensions, "mlp" for expanded hidden dimensions, "heads" for
attention projections, "conv_in"/"conv_out" for convolution channels, "vocab" for embedding tables. Names
follow torch semantics: ``Linear(in, out)``, ``Conv(in, out, kernel, stride, padding)`` on NHWC data.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jdistill.models.net import build_layer, sharding_metadata


@dataclasses.dataclass(frozen=True)
class Precision:
    """Where parameters live and in which dtype the model computes."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


FP32 = Precision()


def linear(
    din: int, dout: int, rngs: nnx.Rngs, p: Precision, *, bias: bool = True, axes=("embed", "mlp")
) -> nnx.Linear:
    return build_layer(
        lambda r: nnx.Linear(
            din,
            dout,
            use_bias=bias,
            dtype=p.dtype,
            param_dtype=p.param_dtype,
            kernel_metadata=sharding_metadata(*axes),
            rngs=r,
        ),
        rngs,
    )


def conv(
    cin: int,
    cout: int,
    kernel: int,
    rngs: nnx.Rngs,
    p: Precision,
    *,
    stride: int = 1,
    padding: int = 0,
    bias=True,
) -> nnx.Conv:
    return build_layer(
        lambda r: nnx.Conv(
            cin,
            cout,
            kernel_size=(kernel, kernel),
            strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            use_bias=bias,
            dtype=p.dtype,
            param_dtype=p.param_dtype,
            kernel_metadata=sharding_metadata(None, None, "conv_in", "conv_out"),
            rngs=r,
        ),
        rngs,
    )


def group_norm(groups: int, channels: int, eps: float, rngs: nnx.Rngs, p: Precision) -> nnx.GroupNorm:
    # Statistics in float32 whatever the compute dtype, as torch autocast does for group norm.
    return build_layer(
        lambda r: nnx.GroupNorm(
            channels,
            num_groups=groups,
            epsilon=eps,
            use_fast_variance=False,  # torch's two-pass variance: E[x^2]-E[x]^2 loses precision on large activations
            dtype=jnp.float32,
            param_dtype=p.param_dtype,
            rngs=r,
        ),
        rngs,
    )


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs, p: Precision, *, affine: bool = True) -> nnx.LayerNorm:
    return build_layer(
        lambda r: nnx.LayerNorm(
            dim,
            epsilon=eps,
            use_bias=affine,
            use_scale=affine,
            use_fast_variance=False,
            dtype=jnp.float32,
            param_dtype=p.param_dtype,
            rngs=r,
        ),
        rngs,
    )


def embed(num: int, dim: int, rngs: nnx.Rngs, p: Precision, *, axes=("vocab", "embed")) -> nnx.Embed:
    return build_layer(
        lambda r: nnx.Embed(
            num,
            dim,
            dtype=p.dtype,
            param_dtype=p.param_dtype,
            embedding_metadata=sharding_metadata(*axes),
            rngs=r,
        ),
        rngs,
    )
