"""Directional derivatives of networks under jit: forward mode, or central differences as a fallback.

sCM and MeanFlow need d/dt of a network output along the ODE, i.e. a Jacobian-vector product. ``jax.jvp``
computes it exactly in one pass, but not through functions with a ``custom_vjp``: the fused attention kernels
(cudnn, splash) are traced as the forward-differentiable chunked attention inside the JVP
(``models.attention.forward_mode_attention``). For other custom-VJP code, ``method="finite_difference"``
takes (f(x + h v) - f(x - h v)) / 2h in float32 instead. Callers pass a closure over stop-gradient
parameters, so no backward graph is built for the tangent pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jdistill.models.attention import forward_mode_attention

PyTree = Any
JVP_METHODS = ("jvp", "finite_difference")


def directional_derivative(
    f: Callable[..., PyTree],
    primals: tuple[PyTree, ...],
    tangents: tuple[PyTree, ...],
    *,
    method: str = "jvp",
    step: float = 1e-3,
) -> tuple[PyTree, PyTree]:
    """(f(*primals), the derivative of f at primals along tangents), in float32."""
    primals = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), primals)
    tangents = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tangents)
    if method == "jvp":
        with (
            forward_mode_attention()
        ):  # fused attention kernels (custom VJPs) traced as chunked attention here
            return jax.jvp(f, primals, tangents)
    if method != "finite_difference":
        raise ValueError(f"unknown JVP method {method!r}; choose one of {JVP_METHODS}")

    def shifted(sign):
        return f(*jax.tree.map(lambda p, v: p + sign * step * v, primals, tangents))

    plus, minus = shifted(1.0), shifted(-1.0)
    derivative = jax.tree.map(
        lambda a, b: (a.astype(jnp.float32) - b.astype(jnp.float32)) / (2 * step), plus, minus
    )
    return f(*primals), derivative
