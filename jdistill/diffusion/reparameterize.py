"""Run a denoiser on another Gaussian path without retraining it.

Two paths x_t = alpha_t x0 + sigma_t eps that reach the same noise-to-signal ratio sigma/alpha carry the
same information about x0: their states differ only by a scale. So a denoiser trained on one path (a VP
UNet, a rectified-flow transformer, the analytic teacher) answers on any other path: at target time t, find
the base time s with sigma_s / alpha_s = sigma_t / (c alpha_t), rescale x_t, and read its (x0, eps) as the
prediction at t. ``c`` (``data_scale``) lets the target path carry the base's data times c (T2I-Distill runs
TrigFlow on latents times sigma_d).

This is SANA-Sprint's training-free flow -> TrigFlow transform (docs/teachers.md) for any pair of schedules:
sCM runs flow, eps and v teachers as TrigFlow models this way, and MeanFlow runs VP teachers on the flow path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.denoiser import Denoiser
from jdistill.diffusion.parameterization import Prediction, path_coefficients
from jdistill.diffusion.schedules import FlowSchedule, Schedule, TrigFlowSchedule, VPSchedule, broadcast_to

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class MatchedDenoiser:
    """``base`` evaluated on ``schedule``'s path (implements the Denoiser interface).

    Times outside what the base path reaches (e.g. TrigFlow's pure noise at pi/2 for a VP teacher, whose last
    step still has alpha = 0.068) are clamped to the base's range: the prediction there is the base's at its
    noisiest step, applied to the rescaled state.
    """

    base: Denoiser
    schedule: Schedule
    data_scale: float = 1.0

    @property
    def embedded_guidance(self) -> bool:
        """The base's: a guidance-distilled teacher read on another path still takes its scale as an input."""
        return bool(getattr(self.base, "embedded_guidance", False))

    def base_time(self, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
        """The base path's time at the target's (alpha, sigma)."""
        base = self.base.schedule
        # |alpha|: float32 cos(pi/2) is -4e-8.
        s = base.time_for_ratio(sigma / (self.data_scale * jnp.abs(alpha)))
        return jnp.clip(s, base.t_min, base.t_max)

    def base_inputs(self, x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x_s, s): the base path's state and time (float32, s per sample) holding what (x_t, t) holds."""
        x_t = x_t.astype(jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
        alpha, sigma = self.schedule.alpha_sigma(t)  # per sample (B,)
        s = self.base_time(alpha, sigma)
        base_alpha, base_sigma = self.base.schedule.alpha_sigma(s)
        # x_t / |(c alpha, sigma)| and x_s / |(alpha_s, sigma_s)| are the same unit-norm mix of x0 and eps.
        scale = jnp.hypot(base_alpha, base_sigma) / jnp.hypot(self.data_scale * alpha, sigma)
        return broadcast_to(scale, x_t) * x_t, s

    def predict(self, params: PyTree, x_t: jax.Array, t: jax.Array, cond: PyTree) -> Prediction:
        x_t = x_t.astype(jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
        pred = self.base.predict(params, *self.base_inputs(x_t, t), cond)
        # Same ratio: the base's (x0, eps) satisfy x_t = alpha (c x0) + sigma eps exactly.
        alpha, sigma, dalpha, dsigma = path_coefficients(self.schedule, t, x_t)
        return Prediction(
            x0=self.data_scale * pred.x0, eps=pred.eps, alpha=alpha, sigma=sigma, dalpha=dalpha, dsigma=dsigma
        )


def same_path(a: Schedule, b: Schedule) -> bool:
    """Whether two schedules define the same path with the same time variable."""
    if a is b:
        return True
    if isinstance(a, TrigFlowSchedule) and isinstance(b, TrigFlowSchedule):
        return a.sigma_data == b.sigma_data
    if isinstance(a, FlowSchedule) and isinstance(b, FlowSchedule):
        return True  # the shift only changes where samplers step, not the path
    if isinstance(a, VPSchedule) and isinstance(b, VPSchedule):
        return a.alphas_cumprod.shape == b.alphas_cumprod.shape and bool(
            np.all(a.alphas_cumprod == b.alphas_cumprod)
        )
    return False


def on_schedule(denoiser: Denoiser, schedule: Schedule, data_scale: float = 1.0) -> Denoiser:
    """``denoiser`` on ``schedule``'s path: itself when it already is on that path (and scale 1)."""
    if data_scale == 1.0 and same_path(denoiser.schedule, schedule):
        return denoiser
    return MatchedDenoiser(denoiser, schedule, data_scale)


def trigflow_output(pred: Prediction, sigma_data: float) -> jax.Array:
    """TrigFlow's network output F = (d x_t / dt) / sigma_d = (cos t eps sigma_d - sin t x0) / sigma_d."""
    return pred.velocity / sigma_data
