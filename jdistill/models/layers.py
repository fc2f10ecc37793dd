"""Layer constructors shared by the converted models, with the dtype policy and sharding names.

Every model takes ``dtype`` (computation) and ``param_dtype`` (storage); parameters carry logical axis names
for the sharding rules: "embed" for model-width dimensions, "mlp" for expanded hidden dimensions, "heads" for
attention projections, "conv_in"/"conv_out" for convolution channels, "vocab" for embedding tables. Names
follow torch semantics: ``Linear(in, out)``, ``Conv(in, out, kernel, stride, padding)`` on NHWC data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models import dense
from jdistill.models.net import build_layer, sharding_metadata


@dataclasses.dataclass(frozen=True)
class Precision:
    """Where parameters live and in which dtype the model computes."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


FP32 = Precision()
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
            # The bias follows the kernel's output axis: a scanned stack's (layers, out) biases are big.
            bias_metadata=sharding_metadata(axes[-1]),
            dot_general=dense.dot_general,  # fast weight gradients on CPU (models/dense.py)
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


# Rematerialisation per block, from most memory to least: "none" keeps every activation for the backward
# pass; "attention" recomputes the transformer blocks (whose attention probabilities dominate at high
# resolution) and keeps the resnets'; "dots" recomputes everything but the matrix products' outputs (XLA's
# dots_saveable: convolutions, norms and softmaxes are recomputed); "full" keeps only each block's input.
REMAT_POLICIES = ("none", "attention", "dots", "full")


def remat_policy(remat: bool | str) -> str:
    """The policy name of a ``remat`` setting (booleans: older configs' off and full)."""
    if isinstance(remat, bool) or remat in ("", None):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r}; choose one of {REMAT_POLICIES}")
    return remat


def block_caller(remat: bool | str, kind: str) -> Callable:
    """``call(module, *args)`` for a sub-module of ``kind`` ("resnet" or "attention") under ``remat``."""
    policy = remat_policy(remat)
    if policy == "none" or (policy == "attention" and kind != "attention"):
        return lambda m, *a: m(*a)
    saved = jax.checkpoint_policies.dots_saveable if policy == "dots" else None
    return nnx.remat(lambda m, *a: m(*a), policy=saved)
