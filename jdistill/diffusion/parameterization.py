"""Parameterizations of a denoiser's output and exact conversions between them.

At a fixed (x_t, t) on the path x_t = alpha x0 + sigma eps, every parameterization is an affine function of
the pair (x0, eps), so a prediction is stored as that pair and the others are derived:

- ``eps``: the noise.                                       (SD1.5, SDXL, SD2.1-base)
- ``x0``: the clean sample.
- ``v``: alpha eps - sigma x0 (diffusers' v-prediction).    (SD2.1-768)
- ``velocity``: d x_t / dt = alpha' x0 + sigma' eps.         (flow matching: eps - x0; TrigFlow: sigma_d F)
- ``score``: grad log p_t(x_t) = -eps / sigma.

Conversions run in float32 whatever the network's dtype: near t = T, 1/alpha is about 15 for Stable Diffusion
and bfloat16 errors would be amplified by as much.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jdistill.diffusion.schedules import Schedule, broadcast_to

PREDICTION_TYPES = ("eps", "x0", "v", "velocity")


@struct.dataclass
class Prediction:
    """A denoiser output at (x_t, t), as the pair (x0, eps) plus the path coefficients at t."""

    x0: jax.Array
    eps: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    dalpha: jax.Array
    dsigma: jax.Array

    @property
    def x_t(self) -> jax.Array:
        return self.alpha * self.x0 + self.sigma * self.eps

    @property
    def v(self) -> jax.Array:
        return self.alpha * self.eps - self.sigma * self.x0

    @property
    def velocity(self) -> jax.Array:
        return self.dalpha * self.x0 + self.dsigma * self.eps

    @property
    def score(self) -> jax.Array:
        return -self.eps / self.sigma

    def as_type(self, kind: str) -> jax.Array:
        """The prediction in parameterization ``kind`` (one of PREDICTION_TYPES)."""
        if kind == "x0":
            return self.x0
        if kind == "eps":
            return self.eps
        if kind == "v":
            return self.v
        if kind == "velocity":
            return self.velocity
        raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTION_TYPES}")


def path_coefficients(schedule: Schedule, t: jax.Array, like: jax.Array) -> tuple[jax.Array, ...]:
    """(alpha, sigma, dalpha, dsigma) at t, float32, shaped to broadcast against ``like``."""
    alpha, sigma = schedule.alpha_sigma(t)
    dalpha, dsigma = schedule.derivatives(t)
    return tuple(broadcast_to(c, like) for c in (alpha, sigma, dalpha, dsigma))


def to_prediction(
    output: jax.Array, kind: str, x_t: jax.Array, schedule: Schedule, t: jax.Array
) -> Prediction:
    """Interpret a raw network output of parameterization ``kind`` at (x_t, t)."""
    output = output.astype(jnp.float32)
    x_t = x_t.astype(jnp.float32)
    alpha, sigma, dalpha, dsigma = path_coefficients(schedule, t, x_t)
    if kind == "eps":
        eps = output
        x0 = (x_t - sigma * eps) / alpha
    elif kind == "x0":
        x0 = output
        eps = (x_t - alpha * x0) / sigma
    elif kind == "v":
        norm = alpha**2 + sigma**2
        x0 = (alpha * x_t - sigma * output) / norm
        eps = (sigma * x_t + alpha * output) / norm
    elif kind == "velocity":
        det = alpha * dsigma - sigma * dalpha
        x0 = (dsigma * x_t - sigma * output) / det
        eps = (alpha * output - dalpha * x_t) / det
    else:
        raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTION_TYPES}")
    return Prediction(x0=x0, eps=eps, alpha=alpha, sigma=sigma, dalpha=dalpha, dsigma=dsigma)


def from_x0(x0: jax.Array, x_t: jax.Array, schedule: Schedule, t: jax.Array) -> Prediction:
    """A prediction given its clean-sample estimate (the form analytic teachers produce)."""
    return to_prediction(x0, "x0", x_t, schedule, t)
