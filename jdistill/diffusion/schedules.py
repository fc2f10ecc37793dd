"""Noise schedules: the Gaussian path x_t = alpha_t * x0 + sigma_t * eps and the network's time input.

Three families cover every teacher jdistill supports:

- ``VPSchedule``: DDPM / Stable Diffusion, discrete timesteps 0..N-1 with alpha_t = sqrt(alphas_cumprod[t]).
- ``FlowSchedule``: rectified flow (SD3, FLUX), t in [0, 1], alpha_t = 1 - t, sigma_t = t, network time 1000 t.
- ``TrigFlowSchedule``: sCM's TrigFlow, t in [0, pi/2], alpha_t = cos t, sigma_t = sigma_d sin t.

Schedules are plain Python objects closed over by jitted functions; their tables are small constants.
All coefficients are returned in float32 whatever the dtype of the data.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear")


def make_betas(kind: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """DDPM betas in float64 (diffusers computes the same values in float32)."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}")


def broadcast_to(coef: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a per-sample coefficient (B,) so it broadcasts against x (B, ...)."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


class Schedule:
    """A Gaussian noising path. Subclasses define ``alpha_sigma`` and the time conventions."""

    t_min: float
    t_max: float

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def derivatives(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(d alpha/dt, d sigma/dt), by forward-mode differentiation of ``alpha_sigma``."""
        t = jnp.asarray(t, jnp.float32)
        _, tangents = jax.jvp(self.alpha_sigma, (t,), (jnp.ones_like(t),))
        return tangents

    def model_time(self, t: jax.Array) -> jax.Array:
        """The time value the network receives."""
        return jnp.asarray(t, jnp.float32)

    def time_for_ratio(self, ratio: jax.Array) -> jax.Array:
        """The time t (float32) at which sigma_t / alpha_t = ``ratio``, clamped to the schedule's range;
        differentiable in ``ratio`` inside it. Two paths at the same ratio hold the same information."""
        raise NotImplementedError

    def add_noise(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        """x_t = alpha_t x0 + sigma_t eps, computed in float32 and returned in x0's dtype."""
        alpha, sigma = self.alpha_sigma(t)
        x_t = broadcast_to(alpha, x0) * x0.astype(jnp.float32) + broadcast_to(sigma, eps) * eps.astype(
            jnp.float32
        )
        return x_t.astype(x0.dtype)

    def prior_sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The noise a sampler starts from at t_max (unit Gaussian; TrigFlow scales it by sigma_d)."""
        return jax.random.normal(key, shape, jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class VPSchedule(Schedule):
    """Discrete variance-preserving schedule (DDPM, Stable Diffusion 1.x/2.x, SDXL).

    Integer timesteps index ``alphas_cumprod``; float timesteps interpolate it linearly, which keeps
    derivatives defined for continuous-time methods.
    """

    alphas_cumprod: np.ndarray

    @classmethod
    def from_betas(
        cls,
        kind: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
    ) -> VPSchedule:
        betas = make_betas(kind, beta_start, beta_end, num_train_timesteps)
        return cls(alphas_cumprod=np.cumprod(1.0 - betas))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 0.0

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.num_train_timesteps - 1)

    def alphas_cumprod_at(self, t: jax.Array) -> jax.Array:
        table = jnp.asarray(self.alphas_cumprod, jnp.float32)
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.integer):
            return table[t]
        t = t.astype(jnp.float32)
        # Clamp without killing the derivative at the ends, and use the end segments' slopes there.
        t = t + jax.lax.stop_gradient(jnp.clip(t, 0.0, self.t_max) - t)
        lo = jnp.minimum(jnp.floor(t), self.num_train_timesteps - 2)
        frac = t - lo
        lo = jax.lax.stop_gradient(lo).astype(jnp.int32)
        return table[lo] * (1.0 - frac) + table[lo + 1] * frac

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        abar = self.alphas_cumprod_at(t)
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

    def time_for_ratio(self, ratio: jax.Array) -> jax.Array:
        # Inverse of the piecewise-linear alphas_cumprod: abar = 1 / (1 + ratio^2), found in its segment.
        table = jnp.asarray(self.alphas_cumprod, jnp.float32)
        abar = 1.0 / (1.0 + jnp.square(jnp.asarray(ratio, jnp.float32)))
        below = jnp.sum(jax.lax.stop_gradient(abar)[..., None] <= table, axis=-1)  # table decreases
        lo = jnp.clip(below - 1, 0, self.num_train_timesteps - 2)
        frac = jnp.clip((table[lo] - abar) / (table[lo] - table[lo + 1]), 0.0, 1.0)
        return lo.astype(jnp.float32) + frac


def shift_sigmas(sigmas: np.ndarray | jax.Array, shift: float):
    """Static timestep shift of SD3 and FLUX-schnell: s' = shift s / (1 + (shift - 1) s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift_exponential(sigmas: np.ndarray | jax.Array, mu: float, power: float = 1.0):
    """Resolution-dependent shift of FLUX-dev: exp(mu) / (exp(mu) + (1/s - 1)^power)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** power)


def flux_mu(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """The mu that FLUX pipelines pass for a given number of latent tokens (linear in the length)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


@dataclasses.dataclass(frozen=True, eq=False)
class FlowSchedule(Schedule):
    """Rectified flow: x_t = (1 - t) x0 + t eps, t in [0, 1]; diffusers models take 1000 t.

    ``shift``, ``mu`` and ``sigma_grid`` say how the teacher's pipeline places its sampling steps (they do not
    change the path): the static shift (SD3: 3), or FLUX-dev's dynamic shift ``mu`` for the world's token count;
    "scheduler": the scheduler's own grid (SD3 pipelines), "flux": FluxPipeline's linspace(1, 1/n, n).
    """

    shift: float = 1.0
    mu: float | None = None
    sigma_grid: str = "scheduler"
    num_train_timesteps: int = 1000
    t_min: float = 0.0
    t_max: float = 1.0

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = jnp.asarray(t, jnp.float32)
        return 1.0 - t, t

    def derivatives(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = jnp.asarray(t, jnp.float32)
        return -jnp.ones_like(t), jnp.ones_like(t)

    def model_time(self, t: jax.Array) -> jax.Array:
        return jnp.asarray(t, jnp.float32) * self.num_train_timesteps

    def time_for_ratio(self, ratio: jax.Array) -> jax.Array:
        ratio = jnp.asarray(ratio, jnp.float32)
        return jnp.where(jnp.isinf(ratio), 1.0, ratio / (1.0 + ratio))


@dataclasses.dataclass(frozen=True, eq=False)
class TrigFlowSchedule(Schedule):
    """TrigFlow (sCM): x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2), t in [0, pi/2].

    Written as a Gaussian path in unit noise: sigma_t = sigma_d sin t. The network sees t itself
    (O(1) time inputs keep the JVPs of continuous-time consistency bounded).
    """

    sigma_data: float = 0.5
    t_min: float = 0.0
    t_max: float = math.pi / 2

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = jnp.asarray(t, jnp.float32)
        return jnp.cos(t), self.sigma_data * jnp.sin(t)

    def derivatives(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = jnp.asarray(t, jnp.float32)
        return -jnp.sin(t), self.sigma_data * jnp.cos(t)

    def prior_sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return self.sigma_data * jax.random.normal(key, shape, jnp.float32)

    def time_for_ratio(self, ratio: jax.Array) -> jax.Array:
        return jnp.arctan(jnp.asarray(ratio, jnp.float32) / self.sigma_data)


SCHEDULE_KINDS = ("vp", "flow", "trigflow")


def make_schedule(
    kind: str,
    *,
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    sigma_data: float = 0.5,
) -> Schedule:
    """A schedule from plain settings (the fields of a config's ``schedule`` section)."""
    if kind == "vp":
        return VPSchedule.from_betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
    if kind == "flow":
        return FlowSchedule(shift=shift, num_train_timesteps=num_train_timesteps)
    if kind == "trigflow":
        return TrigFlowSchedule(sigma_data=sigma_data)
    raise ValueError(f"unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}")


def sample_timesteps(
    schedule: Schedule, key: jax.Array, shape: tuple[int, ...], lo: float = 0.0, hi: float = 1.0
) -> jax.Array:
    """Training timesteps, uniform over the fraction [lo, hi] of the schedule's range.

    VP schedules draw integers: [lo, hi] = [0.02, 0.98] gives U{20, ..., 980} for 1000 steps, as DMD2 and
    SwiftBrush do. Continuous schedules draw floats in [lo t_max, hi t_max].
    """
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"timestep range must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    if isinstance(schedule, VPSchedule):
        n = schedule.num_train_timesteps
        low, high = int(lo * n), min(int(hi * n), n - 1)
        return jax.random.randint(key, shape, low, high + 1)
    span = schedule.t_max - schedule.t_min
    return jax.random.uniform(key, shape, jnp.float32, schedule.t_min + lo * span, schedule.t_min + hi * span)
