"""The linear layers' matrix product, with a weight gradient that XLA's CPU backend runs fast.

Reverse-mode autodiff of ``y = x @ W`` (x of shape (N, in)) makes dW = x^T dy, a product contracting the
leading, non-contiguous dimension of both operands. XLA:CPU hands such products to its slow generic dot
instead of its fast matrix-multiply library: at the digits UNet's size they took about a sixth of the whole
forward and backward pass while doing a fifth of its matrix work (benchmarks/RESULTS.md, 2026-12-04).
``dot_general`` below is ``jax.lax.dot_general`` with a custom JVP whose weight tangent multiplies by a
materialised x^T (an optimisation barrier keeps XLA from folding the transpose back into the product), so the
transposed rule (the backward pass) is a plain (in, N) @ (N, out) product. Values and derivatives are the
same products in another layout: forward mode (``jax.jvp``), reverse mode and their compositions all work.
Other backends, and products other than a linear layer's, use ``jax.lax.dot_general`` unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """``jax.lax.dot_general``; a linear layer's product (lhs (..., in) by rhs (in, out)) on CPU through
    ``_dense``. Signature of ``flax.nnx.Linear``'s ``dot_general`` argument."""
    (lc, rc), (lb, rb) = dimension_numbers
    linear = (
        rhs.ndim == 2
        and tuple(lc) == (lhs.ndim - 1,)
        and tuple(rc) == (0,)
        and not lb
        and not rb
        and out_sharding is None
        and lhs.ndim >= 2
    )
    if not linear or jax.default_backend() != "cpu":
        return jax.lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
    return _dense(lhs, rhs, precision, preferred_element_type)


def _product(x, w, precision, preferred):
    return jax.lax.dot_general(
        x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _dense(x, w, precision, preferred):
    return _product(x, w, precision, preferred)


def _dense_jvp(precision, preferred, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _product(x, w, precision, preferred)
    out = None
    if not isinstance(dx, SymbolicZero):
        out = _product(dx, w, precision, preferred)
    if not isinstance(dw, SymbolicZero):
        # x^T materialised as (in, N): transposing this rule gives dW = x^T dy as a row-major product.
        xt = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
        dy_w = _product(xt.T, dw, precision, preferred).reshape(y.shape)
        out = dy_w if out is None else out + dy_w
    if out is None:
        out = jnp.zeros_like(y)
    return y, out


_dense.defjvp(_dense_jvp, symbolic_zeros=True)
