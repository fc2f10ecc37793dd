"""The FID InceptionV3 in Flax NNX: pytorch-fid's ``fid_inception_v3``, inference only, NHWC, float32.

This is the network behind every published FID number computed with pytorch-fid (the TensorFlow Inception
graph of 2015-12-05 ported to PyTorch), not torchvision's ImageNet Inception3. Its differences from
torchvision's blocks, all kept here:

- ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1``: the 3x3 average pool of the pool branch does not
  count the zero padding (``count_include_pad=False``, as TensorFlow's average pool);
- ``FIDInceptionE_2`` (``Mixed_7c``): that pool is a 3x3 *max* pool (a quirk of the TF graph);
- ``BasicConv2d`` = convolution without bias + batch norm (eps 1e-3, running statistics) + ReLU.

Attribute names are the PyTorch state dict's (``Mixed_6b.branch7x7_2.conv.weight``, ``Mixed_5b.branch1x1.bn.
running_mean``), so ``jdistill.convert.core``'s generic rules map every key; batch norm keeps torch's own names
(weight, bias, running_mean, running_var) and its inference formula x * a + b with a = weight / sqrt(var + eps),
b = bias - mean * a.

``pool3`` gives the 2048-d features FID uses (pytorch-fid's output block 3: global average pool after
``Mixed_7c``) from images already resized and scaled to [-1, 1]; ``jdistill.evaluate.fid`` does that
preprocessing. Convolutions run at ``matmul_precision="highest"`` by default: the default precision on TPUs (and
on GPUs with TF32) rounds operands to bfloat16 / TF32, a change a metric compared across papers should not make.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.net import Net, build_layer, sharding_metadata

FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes + 8 unused); FID does not use it
BN_EPS = 1e-3


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BatchNorm2d(nnx.Module):
    """Inference batch norm over the last (channel) axis with torch's parameter names and formula."""

    def __init__(self, channels: int, eps: float = BN_EPS):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
        return x * scale + (self.bias[...] - self.running_mean[...] * scale)


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d: conv (no bias) + batch norm (eps 1e-3) + ReLU; torch's kernel/padding args."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int | tuple[int, int],
        *,
        rngs: nnx.Rngs,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        matmul_precision: Any = "highest",
    ):
        ph, pw = _pair(padding)
        self.conv = build_layer(
            lambda r: nnx.Conv(
                cin,
                cout,
                kernel_size=_pair(kernel_size),
                strides=(stride, stride),
                padding=((ph, ph), (pw, pw)),
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                precision=matmul_precision,
                kernel_metadata=sharding_metadata(None, None, "conv_in", "conv_out"),
                rngs=r,
            ),
            rngs,
        )
        self.bn = build_layer(lambda r: BatchNorm2d(cout), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """torch's ``F.max_pool2d`` (floor mode) on NHWC; padding never wins (-inf)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), pad
    )


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """``F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)`` on NHWC: each window's sum over
    the number of its positions inside the image (9 inside, 6 on edges, 4 in corners)."""
    window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)  # constant-folded under jit
    return total / count


class FIDInceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs, matmul_precision: Any = "highest"):
        conv = functools.partial(BasicConv2d, rngs=rngs, matmul_precision=matmul_precision)
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """torchvision's InceptionB (``Mixed_6a``), unchanged in the FID network."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs, matmul_precision: Any = "highest"):
        conv = functools.partial(BasicConv2d, rngs=rngs, matmul_precision=matmul_precision)
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
    def __init__(self, cin: int, channels_7x7: int, *, rngs: nnx.Rngs, matmul_precision: Any = "highest"):
        conv = functools.partial(BasicConv2d, rngs=rngs, matmul_precision=matmul_precision)
        c7 = channels_7x7
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """torchvision's InceptionD (``Mixed_7a``), unchanged in the FID network."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs, matmul_precision: Any = "highest"):
        conv = functools.partial(BasicConv2d, rngs=rngs, matmul_precision=matmul_precision)
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
    """``FIDInceptionE_1`` (``pool="avg"``, padding excluded) and ``FIDInceptionE_2`` (``pool="max"``)."""

    def __init__(self, cin: int, *, pool: str, rngs: nnx.Rngs, matmul_precision: Any = "highest"):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")

        conv = functools.partial(BasicConv2d, rngs=rngs, matmul_precision=matmul_precision)
        self.pool = pool
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = max_pool(x, 3, 1, padding=1) if self.pool == "max" else avg_pool_3x3_exclude_pad(x)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
    """pytorch-fid's FID InceptionV3 (torchvision Inception3, aux_logits=False, FID blocks swapped in).

    Input: (B, H, W, 3) float32 in [-1, 1], NHWC (FID uses H = W = 299; see ``jdistill.evaluate.fid``).
    """

    def __init__(self, *, rngs: nnx.Rngs, matmul_precision: Any = "highest", num_classes: int = NUM_CLASSES):
        kw = dict(rngs=rngs, matmul_precision=matmul_precision)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32, **kw)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64, **kw)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128, **kw)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg", **kw)
        self.Mixed_7c = FIDInceptionE(2048, pool="max", **kw)
        # Part of the checkpoint (strict loading covers every tensor of the file); FID does not use it.
        self.fc = build_layer(
            lambda r: nnx.Linear(FEATURE_DIM, num_classes, precision=matmul_precision, rngs=r), rngs
        )

    def pool3(self, x: jax.Array) -> jax.Array:
        """(B, 2048) pool3 features of images (B, H, W, 3) in [-1, 1] (pytorch-fid's output block 3)."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected images (batch, height, width, 3), got shape {x.shape}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 3, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))

    def logits(self, x: jax.Array) -> jax.Array:
        """(B, 1008) classifier logits of the checkpoint (inference: dropout is the identity)."""
        return self.fc(self.pool3(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pool3(x)


@functools.lru_cache(maxsize=4)  # a Net is immutable; building one traces ~100 layers (about 2 s)
def inception_net(matmul_precision: Any = "highest") -> Net:
    """The FID InceptionV3 as a ``Net`` (graph definition + abstract parameters)."""
    return Net("fid_inception", lambda rngs: FIDInceptionV3(rngs=rngs, matmul_precision=matmul_precision))
