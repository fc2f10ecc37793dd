"""Samplers: DDIM, flow Euler, and the few-step student sampler, as one loop over a plan.

A ``SamplerPlan`` lists the times at which the denoiser is evaluated and the path coefficients
(alpha, sigma) of the state each step moves to. Every sampler then reduces to one update given the
prediction (x0, eps) at the current step:

- deterministic (DDIM with eta = 0, flow Euler): x <- alpha' x0 + sigma' eps
- DDIM with eta > 0 (VP only):                x <- alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z
- re-noising (few-step students, FLUX stochastic sampling): x <- alpha' x0 + sigma' z, z fresh noise

On the rectified-flow path the deterministic update equals diffusers' Euler step x + (s' - s) v exactly.
Timestep lists follow diffusers (DDIMScheduler, FlowMatchEulerDiscreteScheduler) so that a student
exported to diffusers samples at the same points.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.parameterization import Prediction
from jdistill.diffusion.schedules import (
    FlowSchedule,
    Schedule,
    TrigFlowSchedule,
    VPSchedule,
    shift_sigmas,
    time_shift_exponential,
)

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

Denoise = Callable[[jax.Array, jax.Array], Prediction]


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """Network evaluation times and the (alpha, sigma) each step lands on; numpy, static under jit."""

    timesteps: np.ndarray
    next_alpha: np.ndarray
    next_sigma: np.ndarray
    ddim_std_ratio: np.ndarray | None = None  # std / eta for DDIM's stochastic variant (VP only)

    def __len__(self) -> int:
        return len(self.timesteps)


def ddim_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """Integer timesteps of diffusers' DDIMScheduler.set_timesteps, largest first."""
    n, total = num_inference_steps, num_train_timesteps
    if not 1 <= n <= total:
        raise ValueError(f"num_inference_steps must be in [1, {total}], got {n}")
    if spacing == "linspace":
        return np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (total // n)).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")


def ddim_plan(
    schedule: VPSchedule,
    num_inference_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> SamplerPlan:
    """DDIM on a VP schedule, with diffusers' rule for the previous timestep (t - N // n)."""
    total = schedule.num_train_timesteps
    ts = ddim_timesteps(num_inference_steps, total, spacing, steps_offset)
    prev = ts - total // num_inference_steps
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    final = 1.0 if set_alpha_to_one else abar[0]
    abar_t = abar[ts]
    abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
    # DDIM (16): sigma_t(eta) / eta = sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
    std_ratio = np.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    return SamplerPlan(ts, np.sqrt(abar_prev), np.sqrt(1 - abar_prev), std_ratio)


def flow_sigmas(
    num_inference_steps: int,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    mu: float | None = None,
) -> np.ndarray:
    """Sigmas (= flow times) of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps, without the final 0.

    ``mu`` selects dynamic (resolution-dependent, FLUX-dev) shifting instead of the static ``shift``. As in
    diffusers, the static shift is applied to the training sigmas first, so the smallest inference sigma
    is shifted twice.
    """
    train = (
        np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float64)[::-1] / num_train_timesteps
    )
    if mu is None:
        train = shift_sigmas(train, shift)
    sigmas = np.linspace(train[0], train[-1], num_inference_steps)
    return time_shift_exponential(sigmas, mu) if mu is not None else shift_sigmas(sigmas, shift)


def flux_sigmas(num_inference_steps: int, shift: float = 1.0, mu: float | None = None) -> np.ndarray:
    """Sigmas of diffusers' FluxPipeline: linspace(1, 1/n, n), shifted by ``mu`` (dynamic shifting, FLUX-dev and
    -lite; ``flux_mu`` of the latent token count) or by the static ``shift`` (FLUX-schnell: 1)."""
    sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
    return time_shift_exponential(sigmas, mu) if mu is not None else shift_sigmas(sigmas, shift)


def flow_euler_plan(
    schedule: FlowSchedule,
    num_inference_steps: int,
    shift: float | None = None,
    mu: float | None = None,
    sigmas: np.ndarray | None = None,
) -> SamplerPlan:
    """Euler on the rectified-flow ODE at the teacher pipeline's sigmas (the schedule's grid, shift and mu; or
    the given ``sigmas``, e.g. ``flux_sigmas``), ending at t = 0."""
    shift = schedule.shift if shift is None else shift
    mu = schedule.mu if mu is None else mu
    if sigmas is None and schedule.sigma_grid == "flux":
        sigmas = flux_sigmas(num_inference_steps, shift, mu)
    elif sigmas is None:
        sigmas = flow_sigmas(num_inference_steps, shift, schedule.num_train_timesteps, mu)
    sigmas = np.asarray(sigmas, np.float64)
    nxt = np.append(sigmas[1:], 0.0)
    return SamplerPlan(sigmas, 1.0 - nxt, nxt)


def student_plan(schedule: Schedule, timesteps: tuple[float, ...] | np.ndarray) -> SamplerPlan:
    """Few-step student: predict x0 at each timestep, re-noise it to the next one; the last x0 is returned."""
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError(f"student timesteps must be a non-empty 1-D list, got {timesteps!r}")
    if len(ts) > 1 and not np.all(np.diff(ts) < 0):
        raise ValueError(f"student timesteps must decrease strictly, got {list(timesteps)}")
    alphas, sigmas = (np.asarray(a, np.float64) for a in schedule.alpha_sigma(jnp.asarray(ts[1:])))
    return SamplerPlan(ts, np.append(alphas, 1.0), np.append(sigmas, 0.0))


def path_plan(schedule: Schedule, timesteps: np.ndarray) -> SamplerPlan:
    """The deterministic (DDIM-type) sampler through ``timesteps`` on any path, ending at t_min: each step
    moves the prediction (x0, eps) to the next time's (alpha, sigma), first order in the ODE."""
    ts = np.asarray(timesteps, np.float64)
    nxt = jnp.asarray(np.append(ts[1:], schedule.t_min), jnp.float32)
    alphas, sigmas = (np.asarray(a, np.float64) for a in schedule.alpha_sigma(nxt))
    return SamplerPlan(ts, alphas, sigmas)


def ode_plan(schedule: Schedule, num_inference_steps: int, spacing: str = "leading") -> SamplerPlan:
    """The teacher's deterministic sampler: DDIM on VP schedules, flow Euler on rectified flow, DDIM-type
    steps uniform in t on TrigFlow."""
    if isinstance(schedule, VPSchedule):
        return ddim_plan(schedule, num_inference_steps, spacing=spacing)
    if isinstance(schedule, FlowSchedule):
        return flow_euler_plan(schedule, num_inference_steps)
    if isinstance(schedule, TrigFlowSchedule):
        return path_plan(schedule, np.linspace(schedule.t_max, schedule.t_min, num_inference_steps + 1)[:-1])
    raise ValueError(f"no deterministic sampler for a {type(schedule).__name__}")


def run_sampler(
    denoise: Denoise,
    x: jax.Array,
    plan: SamplerPlan,
    *,
    renoise: bool = False,
    eta: float = 0.0,
    key: jax.Array | None = None,
    unroll: bool | int = 1,
) -> jax.Array:
    """Integrate from ``x`` (noise at plan.timesteps[0]) through the plan; returns the final sample (float32).

    ``denoise(x_t, t)`` takes t as a per-sample vector of schedule times and returns a Prediction.
    ``renoise`` draws fresh noise at every step (few-step student sampling); ``eta`` > 0 is DDIM's
    stochastic variant. Both need ``key``.
    """
    stochastic = renoise or eta > 0
    if stochastic and key is None:
        raise ValueError("a PRNG key is needed for re-noising or eta > 0")
    if eta > 0 and plan.ddim_std_ratio is None:
        raise ValueError("eta > 0 is only defined for DDIM plans on a VP schedule")
    n = len(plan)
    std = np.zeros(n) if plan.ddim_std_ratio is None else eta * plan.ddim_std_ratio
    xs = (
        jnp.asarray(plan.timesteps),
        jnp.asarray(plan.next_alpha, jnp.float32),
        jnp.asarray(plan.next_sigma, jnp.float32),
        jnp.asarray(std, jnp.float32),
        jax.random.split(key, n) if stochastic else jnp.zeros((n,)),
    )
    batch = x.shape[0]

    def body(x, step):
        t, alpha, sigma, s, k = step
        pred = denoise(x, jnp.broadcast_to(t, (batch,)))
        if renoise:
            noise = jax.random.normal(k, x.shape, jnp.float32)
            x_next = alpha * pred.x0 + sigma * noise
        elif eta > 0:
            noise = jax.random.normal(k, x.shape, jnp.float32)
            x_next = alpha * pred.x0 + jnp.sqrt(jnp.maximum(sigma**2 - s**2, 0.0)) * pred.eps + s * noise
        else:
            x_next = alpha * pred.x0 + sigma * pred.eps
        return x_next.astype(jnp.float32), None

    x, _ = jax.lax.scan(body, x.astype(jnp.float32), xs, unroll=unroll)
    return x
