"""models/dense.py: the linear layers' product with a CPU-friendly weight gradient equals jax.lax.dot_general
and its derivatives (reverse, forward, forward-over-reverse, vmapped), computed by JAX's own rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.models.dense import dot_general

DN = (((2,), (0,)), ((), ()))


def ours(x, w):
    return jnp.sum(jnp.sin(dot_general(x, w, DN)) * x[..., :1])


def plain(x, w):
    return jnp.sum(jnp.sin(jax.lax.dot_general(x, w, DN)) * x[..., :1])


@pytest.fixture(scope="module")
def xw():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32), jnp.asarray(
        rng.standard_normal((4, 6)), jnp.float32
    )


def close(a, b):
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-5, atol=1e-5)


def test_values_and_gradients_match_dot_general(xw):
    x, w = xw
    close(jax.jit(ours)(x, w), plain(x, w))
    close(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(plain, (0, 1))(x, w))
    close(jax.grad(ours, 1)(x, w), jax.grad(plain, 1)(x, w))  # input not differentiated
    close(jax.grad(ours, 0)(x, w), jax.grad(plain, 0)(x, w))  # kernel frozen


def test_forward_mode_and_second_order_match(xw):
    x, w = xw
    v, u = jnp.ones_like(x), jnp.full_like(w, 0.5)
    close(jax.jvp(ours, (x, w), (v, u)), jax.jvp(plain, (x, w), (v, u)))

    def jvp_grad(f):  # sCM / MeanFlow differentiate through a JVP
        return jax.grad(lambda w: jax.jvp(lambda y: f(y, w), (x,), (v,))[1])(w)

    close(jvp_grad(ours), jvp_grad(plain))
    batched = jax.vmap(jax.grad(ours, 1), (0, None))(x[:, None], w)
    close(batched, jax.vmap(jax.grad(plain, 1), (0, None))(x[:, None], w))


def test_other_products_pass_through():
    batch_dims = (((2,), (1,)), ((0,), (0,)))
    a = jnp.ones((3, 5, 4))
    b = jnp.ones((3, 4, 2))
    np.testing.assert_array_equal(dot_general(a, b, batch_dims), jax.lax.dot_general(a, b, batch_dims))
