"""Attention implementations against a plain float64 softmax(q k^T / sqrt(d)) v: values, gradients, JVPs,
the Pallas splash kernel in interpret mode (alone and batch-sharded over a mesh), routing rules, and forward
mode through a tiny UNet configured with fused kernels."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs

from jdistill.models.attention import (
    ATTENTION_IMPLS,
    attention,
    attention_options,
    forward_mode_attention,
    resolve_impl,
)
from jdistill.models.chunked_attention import chunked_attention


def reference(q, k, v, mask=None, causal=False):
    """The textbook formula in float64 numpy; mask True = attend."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def plain_jnp(q, k, v):
    """The same formula in float32 jnp, for reference gradients."""
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def qkv(b, tq, tk, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        rng.standard_normal(s).astype(np.float32) for s in ((b, tq, h, d), (b, tk, h, d), (b, tk, h, d))
    )


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# (batch, queries, keys, heads, head_dim, block_q, block_kv): self-attention over 64 tokens, cross-attention
# with 77 text tokens, lengths no block divides, and blocks larger than the sequence.
SHAPES = [
    (2, 64, 64, 2, 8, 16, 16),
    (2, 64, 77, 2, 8, 16, 32),
    (1, 37, 53, 3, 5, 8, 16),
    (2, 10, 10, 1, 4, 512, 1024),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_values_and_gradients_match_the_plain_formula(shape):
    b, tq, tk, h, d, bq, bkv = shape
    q, k, v = qkv(b, tq, tk, h, d)
    remat = tq != tk  # the cross-attention shapes also recompute each key block in the backward pass
    run = jax.jit(lambda q, k, v: chunked_attention(q, k, v, block_q=bq, block_kv=bkv, remat_steps=remat))
    assert max_rel(run(q, k, v), reference(q, k, v)) < 1e-5

    w = np.random.default_rng(1).standard_normal((b, tq, h, d)).astype(np.float32)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(lambda *a: jnp.sum(plain_jnp(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for got, want, name in zip(grads, expected, "qkv", strict=True):
        assert max_rel(got, want) < 1e-5, name


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "x".join(map(str, s)))
def test_chunked_jvp_matches_central_differences(shape):
    b, tq, tk, h, d, bq, bkv = shape
    primals = qkv(b, tq, tk, h, d)
    tangents = qkv(b, tq, tk, h, d, seed=7)
    _, tangent = jax.jit(
        lambda p, t: jax.jvp(lambda *a: chunked_attention(*a, block_q=bq, block_kv=bkv), p, t)
    )(primals, tangents)
    eps = 1e-4  # float64 reference: truncation error ~eps^2
    plus = reference(*(p + eps * t.astype(np.float64) for p, t in zip(primals, tangents, strict=True)))
    minus = reference(*(p - eps * t.astype(np.float64) for p, t in zip(primals, tangents, strict=True)))
    assert max_rel(tangent, (plus - minus) / (2 * eps)) < 1e-5


def test_chunked_masks_causal_and_half_precision():
    b, tq, tk, h, d = 2, 21, 21, 2, 8
    q, k, v = qkv(b, tq, tk, h, d)
    rng = np.random.default_rng(3)
    padding = np.ones((b, 1, 1, tk), bool)
    padding[0, ..., 15:] = False  # CLIP-style key padding
    full = rng.random((b, h, tq, tk)) > 0.3
    full[..., 0] = True  # every row sees a key
    blocks = dict(block_q=8, block_kv=8)
    assert max_rel(chunked_attention(q, k, v, mask=padding, **blocks), reference(q, k, v, padding)) < 1e-5
    assert max_rel(chunked_attention(q, k, v, mask=full, **blocks), reference(q, k, v, full)) < 1e-5
    causal = chunked_attention(q, k, v, mask=padding, is_causal=True, **blocks)
    assert max_rel(causal, reference(q, k, v, padding, causal=True)) < 1e-5

    half = chunked_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), **blocks)
    assert half.dtype == jnp.bfloat16
    assert max_rel(half, reference(q, k, v)) < 2e-2  # bfloat16 inputs and output, float32 statistics

    with pytest.raises(ValueError, match="does not broadcast"):
        chunked_attention(q, k, v, mask=np.ones((b, 1, 5, tk), bool))
    with pytest.raises(ValueError, match="block sizes must be positive"):
        chunked_attention(q, k, v, block_q=0)


SPLASH = dict(interpret=True, splash_min_length=1, splash_block_q=128, splash_block_kv=128)


def one_device():
    """A one-device mesh: the tests run on 8 fake devices, where splash needs a mesh to place the kernel."""
    mesh = jax.make_mesh(
        (1, 1), ("data", "fsdp"), (jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:1]
    )
    return jax.set_mesh(mesh)


def test_splash_kernel_in_interpret_mode_matches_the_plain_formula():
    """Lengths 200 x 150 (both padded to the 128 blocks) and SD1.5's head_dim 40."""
    q, k, v = qkv(1, 200, 150, 2, 40)
    w = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    with one_device(), attention_options(**SPLASH):
        assert resolve_impl("splash", dtype=jnp.float32, batch=1, key_length=150, masked=False) == "splash"
        out = jax.jit(lambda *a: attention(*a, impl="splash"))(q, k, v)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(attention(*a, impl="splash") * w), argnums=(0, 1, 2)))(
            q, k, v
        )
        causal = jax.jit(lambda *a: attention(*a, impl="splash", is_causal=True))(
            q, q, v[:, :1].repeat(200, 1)
        )
    assert max_rel(out, reference(q, k, v)) < 1e-5
    assert max_rel(causal, reference(q, q, v[:, :1].repeat(200, 1), causal=True)) < 1e-5
    expected = jax.grad(lambda *a: jnp.sum(plain_jnp(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for got, want, name in zip(grads, expected, "qkv", strict=True):
        assert max_rel(got, want) < 1e-4, name  # the kernel's backward accumulates blocks in float32


def test_splash_under_a_mesh_runs_per_device_on_batch_shards():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    q, k, v = qkv(8, 130, 130, 1, 8)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh), attention_options(**SPLASH):
        f = jax.jit(lambda *a: attention(*a, impl="splash"), in_shardings=batch, out_shardings=batch)
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
        out = f(q, k, v)
        # A batch of 6 does not divide over 8 devices: the partitionable chunked path instead.
        assert resolve_impl("splash", dtype=jnp.float32, batch=6, key_length=130, masked=False) == "chunked"
    assert max_rel(out, reference(q, k, v)) < 1e-5
    # Eight devices and no mesh set: nothing says how arrays are split, so no per-device kernel either.
    with attention_options(**SPLASH):
        assert resolve_impl("splash", dtype=jnp.float32, batch=8, key_length=130, masked=False) == "chunked"


def test_routing_and_errors():
    def pick(impl, **kw):
        args = dict(dtype=jnp.float32, batch=2, key_length=4096, masked=False) | kw
        return resolve_impl(impl, **args)

    assert set(ATTENTION_IMPLS) == {"xla", "chunked", "cudnn", "splash", "auto"}
    assert pick("auto") == "xla"  # CPU
    assert pick("splash", key_length=77) == "xla"  # text cross-attention: below splash_min_length
    assert pick("splash", masked=True) == "chunked"
    assert pick("splash") == "chunked"  # 8 devices but no mesh: no per-device placement for the kernel
    with one_device(), pytest.raises(ValueError, match="runs on TPU only"):
        pick("splash")
    with forward_mode_attention():
        assert pick("splash") == pick("cudnn") == "chunked"
        assert pick("xla") == "xla"
    assert pick("cudnn") == "cudnn"  # the context ended
    # "auto" on a GPU, as the trace would see it: cuDNN for latent self-attention in half precision only.
    with mock.patch("jdistill.models.attention.mesh_platform", return_value="gpu"):
        assert pick("auto", dtype=jnp.bfloat16) == "cudnn"
        assert pick("auto", dtype=jnp.bfloat16, key_length=77) == "xla"  # refused by cuDNN in training
        assert pick("auto") == "xla"  # float32
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'; choose one of \('xla'"):
        pick("flash")
    with pytest.raises(ValueError, match="unknown attention options"), attention_options(block=3):
        pass


def test_jvp_needs_forward_mode_attention_through_the_splash_kernel():
    q, k, v = qkv(1, 130, 130, 1, 8)
    t = qkv(1, 130, 130, 1, 8, seed=5)

    def f(*a):
        return attention(*a, impl="splash")

    with one_device(), attention_options(**SPLASH):
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jvp(f, (q, k, v), t)
        with forward_mode_attention():
            _, tangent = jax.jit(lambda p, t: jax.jvp(f, p, t))((q, k, v), t)
    _, expected = jax.jvp(plain_jnp, (q, k, v), t)
    assert max_rel(tangent, expected) < 1e-5


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_directional_derivative_through_a_unet_with_a_fused_kernel(impl):
    """sCM/MeanFlow's JVP helper on a tiny UNet configured with a fused kernel equals the XLA UNet's JVP."""
    from jdistill.diffusion.jvp import directional_derivative
    from jdistill.models.unet import UNetConfig, unet_net

    cfg = UNetConfig.from_dict(tiny_configs.unet(sample_size=8))
    xla_net, fused_net = unet_net(cfg), unet_net(cfg, attention_impl=impl)
    params = xla_net.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x, dx = (jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32) for _ in range(2))
    t = jnp.asarray([500.0])
    cond = {"encoder_hidden_states": jnp.asarray(rng.standard_normal((1, 7, 32)), jnp.float32)}

    def tangent(net):
        return directional_derivative(
            lambda y, s: net.apply(params, y, s, cond), (x, t), (dx, jnp.ones_like(t))
        )[1]

    # splash_min_length=1 sends even these 16-token maps to the kernel (outside forward mode).
    with attention_options(splash_min_length=1):
        got = jax.jit(lambda: tangent(fused_net))()
    assert max_rel(got, jax.jit(lambda: tangent(xla_net))()) < 1e-5


def test_config_names_the_attention_choices():
    import pathlib

    from jdistill import configuration

    spec = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "dmd2.py") + ":sd15"
    assert (
        configuration.load(spec, [("teacher.attention_impl", "chunked")]).teacher.attention_impl == "chunked"
    )
    with pytest.raises(
        configuration.ConfigError, match=r"'teacher.attention_impl' has value 'flash'.*'splash'"
    ):
        configuration.load(spec, [("teacher.attention_impl", "flash")])
