"""Multi-step students in training: DMD2's backward simulation and few-step SiD's uniform step mixture.

A k-step student runs at timesteps t_0 > t_1 > ... > t_{K-1}, starting from prior noise at t_0: predict x0,
re-noise it to the next timestep with fresh noise. Training picks one step index k per train step (the same on
every device: it comes from the replicated step key), runs the first k steps without gradient, and trains the
student at t_k on their output (k = 0: pure noise at t_0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdistill.diffusion.parameterization import Prediction
from jdistill.diffusion.samplers import SamplerPlan, run_sampler, student_plan
from jdistill.diffusion.schedules import Schedule
from jdistill.rng import streams

PyTree = Any
PredictX0 = Callable[[PyTree, jax.Array, jax.Array], jax.Array]  # (params, x_t, t per sample) -> x0


def draw_step_index(key: jax.Array, num_steps: int) -> jax.Array:
    """k ~ U{0..num_steps-1} as an int32 scalar (shared across devices: the key is replicated)."""
    return jax.random.randint(key, (), 0, num_steps, jnp.int32)


def backward_simulate(
    predict_x0: PredictX0,
    params: PyTree,
    z: jax.Array,
    timesteps: tuple[float, ...],
    k: jax.Array,
    key: jax.Array,
    schedule: Schedule,
) -> tuple[jax.Array, jax.Array]:
    """(x_{t_k}, t_k per sample): the student's own first k steps from ``z``, without gradient.

    Parameters are stop-gradiented before the loop, so the traced-length loop needs no reverse-mode rule and
    the step count costs only the k forward passes it runs.
    """
    ts = jnp.asarray(timesteps, jnp.float32)
    n = z.shape[0]
    frozen = jax.lax.stop_gradient(params)

    def step(i, x):
        x0 = predict_x0(frozen, x, jnp.broadcast_to(ts[i], (n,)))
        eps = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        return schedule.add_noise(x0.astype(jnp.float32), eps, jnp.broadcast_to(ts[i + 1], (n,)))

    if len(timesteps) == 1:
        return z, jnp.broadcast_to(ts[0], (n,))
    x = jax.lax.fori_loop(0, k, step, z.astype(jnp.float32))
    return jax.lax.stop_gradient(x), jnp.broadcast_to(ts[k], (n,))


def sampler_noise(
    key: jax.Array, schedule: Schedule, shape: tuple[int, ...], scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """(initial noise, key for re-noising) of a student sampler: the prior noise comes from the "latent" stream
    of the sampling key (tests rebuild it to run the teacher's ODE from the same noise)."""
    k = streams(key, "latent", "renoise")
    return scale * schedule.prior_sample(k["latent"], shape), k["renoise"]


class SamplerStart(NamedTuple):
    """What a student sampler starts from, for one batch of conditions."""

    noise: jax.Array  # the first step's input: ``scale`` times prior noise, (batch, *sample_shape)
    renoise_key: jax.Array  # the key of the fresh noise drawn between steps
    cond: PyTree  # the student's conditioning (with its guidance input for the sampling guidance, if any)
    params: PyTree  # the sampling network's parameters as its module takes them


def sampler_start(
    key: jax.Array,
    schedule: Schedule,
    sample_shape: tuple[int, ...],
    cond: PyTree,
    params: PyTree,
    *,
    student_cond: Callable[[PyTree], PyTree] | None = None,
    scale: float = 1.0,
) -> SamplerStart:
    """The prologue every student sampler shares: the batch size read from ``cond``, the prior noise and the
    re-noising key (``sampler_noise``), the student's conditioning (``student_cond(cond)``: e.g. with the
    sampling guidance as its input; None: ``cond`` as it is) and the parameters (``params``, already what the
    network's module takes: ``Network.net_params``)."""
    n = jax.tree.leaves(cond)[0].shape[0]
    noise, renoise_key = sampler_noise(key, schedule, (n, *sample_shape), scale)
    return SamplerStart(noise, renoise_key, cond if student_cond is None else student_cond(cond), params)


def renoising_sampler(
    predict: Callable[[PyTree, jax.Array, jax.Array, PyTree], Prediction],
    plan: SamplerPlan,
    schedule: Schedule,
    sample_shape: tuple[int, ...],
    net_params: Callable[[PyTree], PyTree] = lambda params: params,
    *,
    student_cond: Callable[[PyTree], PyTree] | None = None,
    scale: float = 1.0,
) -> Callable[[PyTree, PyTree, jax.Array], jax.Array]:
    """A few-step student's sampler, ``(params, cond, key) -> samples``: ``predict(net_params(params), x_t, t,
    cond)`` at each time of ``plan``, its x0 re-noised with fresh noise to the next time; the last x0 is the
    sample. ``sampler_start`` prepares the inputs (``student_cond``, ``scale``)."""

    def sample(params: PyTree, cond: PyTree, key: jax.Array) -> jax.Array:
        start = sampler_start(
            key, schedule, sample_shape, cond, net_params(params), student_cond=student_cond, scale=scale
        )
        return run_sampler(
            lambda x_t, t: predict(start.params, x_t, t, start.cond),
            start.noise,
            plan,
            renoise=True,
            key=start.renoise_key,
        )

    return sample


STUDENT_INPUTS = ("noise", "noised_zero")


class FewStepStudent:
    """A one- or few-step student: its training output (backward simulation) and its sampler.

    ``student_input`` is the first step's input convention, recipe data: "noise" feeds prior noise z labelled
    t_0 (SwiftBrush, DMD2; DMD2's SDXL one-step student labels pure noise t_0 = 399); "noised_zero" feeds
    sigma_{t_0} z, a zero image noised to t_0 (SiD-LSG: t_0 = 625).
    """

    def __init__(
        self,
        denoiser,
        sample_shape: tuple[int, ...],
        timesteps: tuple[float, ...],
        student_input: str = "noise",
    ):
        if student_input not in STUDENT_INPUTS:
            raise ValueError(f"student input {student_input!r}; choose one of {STUDENT_INPUTS}")
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.sample_shape = tuple(sample_shape)
        self.timesteps = tuple(float(t) for t in timesteps)
        lo, hi = self.schedule.t_min, self.schedule.t_max
        if not all(lo <= t <= hi for t in self.timesteps):
            raise ValueError(
                f"student timesteps {self.timesteps} lie outside the teacher schedule's time range [{lo:g}, "
                f"{hi:g}] ({type(self.schedule).__name__}; flow teachers count time in [0, 1], e.g. (1.0,))"
            )
        self.plan = student_plan(self.schedule, self.timesteps)  # validates: non-empty, decreasing
        self.input_scale = 1.0
        if student_input == "noised_zero":
            _, sigma = self.schedule.alpha_sigma(jnp.asarray(self.timesteps[0]))
            self.input_scale = float(sigma)

    def prior(self, key: jax.Array, n: int) -> jax.Array:
        """The first step's input."""
        return self.input_scale * self.schedule.prior_sample(key, (n, *self.sample_shape))

    def _x0(self, params, x_t, t, cond):
        return self.denoiser.predict(params, x_t, t, cond).x0

    def generate(self, params: PyTree, cond: PyTree, key: jax.Array) -> jax.Array:
        """x0 from the student at a step drawn uniformly (the earlier steps simulated without gradient);
        differentiable with respect to ``params`` through the last step only."""
        n = jax.tree.leaves(cond)[0].shape[0]
        k = streams(key, "latent", "step_index", "simulate")
        z = self.prior(k["latent"], n)
        index = draw_step_index(k["step_index"], len(self.timesteps))
        x_in, t_in = backward_simulate(
            lambda p, x, t: self._x0(p, x, t, cond),
            params,
            z,
            self.timesteps,
            index,
            k["simulate"],
            self.schedule,
        )
        return self._x0(params, x_in, t_in, cond)

    def sample(self, params: PyTree, cond: PyTree, key: jax.Array) -> jax.Array:
        """The deployed sampler: all steps, fresh noise between them."""
        sampler = renoising_sampler(
            self.denoiser.predict, self.plan, self.schedule, self.sample_shape, scale=self.input_scale
        )
        return sampler(params, cond, key)
