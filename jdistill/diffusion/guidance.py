"""Classifier-free guidance.

Two conventions are in use and every recipe records which one it follows:

- ``"uncond"``: y = y_u + w (y_c - y_u)   (Ho & Salimans; diffusers pipelines, DMD2, SwiftBrush, SiD)
- ``"cond"``:   y = y_c + w (y_c - y_u)   (LCM, CausVid; equal to the first with w + 1)

Guidance is affine, so it commutes with every parameterization conversion at fixed (x_t, t): combining
(x0, eps) pairs keeps x_t = alpha x0 + sigma eps exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.parameterization import Prediction
from jdistill.diffusion.schedules import broadcast_to

CFG_CONVENTIONS = ("uncond", "cond")


def cfg_combine(
    cond: jax.Array, uncond: jax.Array, scale: float | jax.Array, convention: str = "uncond"
) -> jax.Array:
    """Combine conditional and unconditional outputs (float32); ``scale`` may be per sample (B,)."""
    cond = cond.astype(jnp.float32)
    uncond = uncond.astype(jnp.float32)
    scale = broadcast_to(jnp.asarray(scale, jnp.float32), cond) if jnp.ndim(scale) else scale
    if convention == "uncond":
        return uncond + scale * (cond - uncond)
    if convention == "cond":
        return cond + scale * (cond - uncond)
    raise ValueError(f"unknown CFG convention {convention!r}; choose one of {CFG_CONVENTIONS}")


def guide(
    cond: Prediction, uncond: Prediction, scale: float | jax.Array, convention: str = "uncond"
) -> Prediction:
    """Guided prediction from a conditional and an unconditional one at the same (x_t, t)."""
    return cond.replace(
        x0=cfg_combine(cond.x0, uncond.x0, scale, convention),
        eps=cfg_combine(cond.eps, uncond.eps, scale, convention),
    )


def in_cond_convention(scale: float, convention: str) -> float:
    """The same guidance as ``scale`` under ``convention``, written in convention "cond" (y_c + w (y_c - y_u)):
    w_cond = w_uncond - 1."""
    if convention not in CFG_CONVENTIONS:
        raise ValueError(f"unknown CFG convention {convention!r}; choose one of {CFG_CONVENTIONS}")
    return float(scale) - (1.0 if convention == "uncond" else 0.0)


def is_identity(scale: Any, convention: str) -> bool:
    """True when guidance with this (static) scale returns the conditional prediction unchanged."""
    if scale is None:
        return True
    if isinstance(scale, (jax.Array, np.ndarray)):
        return False
    return (convention == "uncond" and scale == 1.0) or (convention == "cond" and scale == 0.0)


def select_cond(cond: Any, uncond: Any, use_uncond: jax.Array) -> Any:
    """Per-sample choice between two conditioning pytrees (prompt dropout, unconditional passes)."""

    def pick(c, u):
        u = jnp.broadcast_to(u, c.shape).astype(c.dtype)
        return jnp.where(broadcast_to(use_uncond, c), u, c)

    return jax.tree.map(pick, cond, uncond)


def concat_cond(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, jnp.broadcast_to(y, x.shape).astype(x.dtype)]), a, b)


def guided_predict(
    predict: Callable[[jax.Array, jax.Array, Any], Prediction],
    x_t: jax.Array,
    t: jax.Array,
    cond: Any,
    uncond: Any,
    scale: float | jax.Array | None,
    convention: str = "uncond",
) -> Prediction:
    """Run ``predict(x_t, t, cond)`` with classifier-free guidance.

    The conditional and unconditional passes share one batched call. ``uncond`` is a conditioning pytree
    that broadcasts against ``cond`` (e.g. the null label, or the empty-prompt embedding).
    """
    if is_identity(scale, convention):
        return predict(x_t, t, cond)
    n = x_t.shape[0]
    both = predict(
        jnp.concatenate([x_t, x_t]),
        jnp.concatenate([jnp.broadcast_to(t, (n,)), jnp.broadcast_to(t, (n,))]),
        concat_cond(cond, uncond),
    )
    c = jax.tree.map(lambda a: a[:n] if a.shape and a.shape[0] == 2 * n else a, both)
    u = jax.tree.map(lambda a: a[n:] if a.shape and a.shape[0] == 2 * n else a, both)
    return guide(c, u, scale, convention)
