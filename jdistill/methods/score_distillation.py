"""What the score-distillation recipes (swiftbrush, dmd, dmd2, sid, sid_lsg) share: a few-step student, a
fake score trained online on the student's samples, the noised generation a generator loss starts from, the
fake score's denoising update, and the recipe that ties them together."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jdistill.diffusion.denoiser import Denoiser, predict_cfg
from jdistill.diffusion.guidance import is_identity
from jdistill.diffusion.schedules import sample_timesteps
from jdistill.methods.adversarial import Discriminator
from jdistill.methods.common import (
    ResidualDenoiser,
    build_network,
    drop_conditions,
    network_denoiser,
)
from jdistill.methods.distribution import (
    NONFINITE_ROWS,
    finite_denoising_loss,
    finite_rows,
    nonfinite_count,
    zero_bad_rows,
)
from jdistill.methods.recipe import LossFn, Network, Pass, Recipe, Update
from jdistill.methods.rollout import FewStepStudent
from jdistill.rng import streams

PyTree = Any
TimeSampler = Callable[[jax.Array, tuple[int, ...]], jax.Array]  # (key, shape) -> times in schedule units


@dataclasses.dataclass(frozen=True, eq=False)
class StudentAndFake:
    student_net: Network
    fake_net: Network
    student: FewStepStudent
    fake: Denoiser
    fake_params: Callable[[dict], PyTree]  # all params -> what ``fake.predict`` takes

    def student_params(self, params: dict) -> PyTree:
        """All params -> what the student's denoiser takes (its own, or the teacher plus its LoRA)."""
        return self.student_net.net_params(params)

    def noised_generation(
        self, params, cond, key, t_range, *, detach: bool, sample_t: TimeSampler | None = None
    ):
        """(x, ok, t, x_t): the student's sample (non-finite samples zeroed so that the networks downstream and
        the gradients stay finite; ``ok`` marks the others, and the caller's loss leaves the zeroed ones out
        and counts them), t ~ U(t_range) in schedule fractions (or ``sample_t(key, shape)``), and x_t noised
        from sg(x) (``detach``) or from x itself."""
        k = streams(key, "generate", "timestep", "noise")
        x = self.student.generate(self.student_params(params), cond, k["generate"])
        ok = finite_rows(x)
        x = zero_bad_rows(x, ok)
        schedule = self.student.schedule
        if sample_t is None:
            t = sample_timesteps(schedule, k["timestep"], (x.shape[0],), *t_range)
        else:
            t = sample_t(k["timestep"], (x.shape[0],))
        eps = jax.random.normal(k["noise"], x.shape, jnp.float32)
        return x, ok, t, schedule.add_noise(jax.lax.stop_gradient(x) if detach else x, eps, t)

    def generation_passes(self, grad: str, unless_carried: str = "") -> tuple[Pass, ...]:
        """The student's evaluations in ``generate``: a few-step student's backward simulation (k ~ U{0..K-1}
        forwards without gradient, (K - 1) / 2 expected) and the differentiated last step."""
        k = len(self.student.timesteps)
        rollout = (Pass("student", (k - 1) / 2, "none", unless_carried),) if k > 1 else ()
        return (*rollout, Pass("student", 1.0, grad, unless_carried))

    def fake_passes(self, samples: float, grad: str) -> tuple[Pass, ...]:
        """The fake score's evaluations: its network, and the teacher under a residual fake score."""
        if isinstance(self.fake, ResidualDenoiser):
            return (
                Pass("teacher", samples, "none" if grad == "params" else grad),
                Pass("fake_score", samples, grad),
            )
        return (Pass("fake_score", samples, grad),)

    def fake_score_passes(self, m: ml_collections.ConfigDict, guidance: float = 1.0, noise_draws: int = 1):
        """``fake_score_update``'s passes (without a discriminator)."""
        samples = noise_draws * cfg_evaluations(guidance, m.cfg_convention, self.fake)
        return (
            *self.generation_passes("none", unless_carried="generated"),
            *self.fake_passes(samples, "params"),
        )

    def _fake_score_loss(self, world, m, guidance, noise_draws, discriminator, sample_t) -> LossFn:
        """``fake_score_update``'s loss."""
        schedule = self.student.schedule

        def loss(params, batch, key, carry):
            k = streams(key, "generate", "timestep", "noise", "dropout", "gan")
            cond = batch["cond"]
            if carry.generated is not None:
                x = carry.generated
            else:
                x = jax.lax.stop_gradient(
                    self.student.generate(self.student_params(params), cond, k["generate"])
                )
            ok = finite_rows(x)
            x = zero_bad_rows(x, ok)
            generated, generated_ok = x, ok
            if noise_draws > 1:  # variance reduction: several noisings of each generated sample
                x = jnp.concatenate([x] * noise_draws)
                cond = jax.tree.map(lambda c: jnp.concatenate([c] * noise_draws), cond)
                ok = jnp.concatenate([ok] * noise_draws)
            n = x.shape[0]
            if sample_t is None:
                t = sample_timesteps(schedule, k["timestep"], (n,), *m.fake_t_range)
            else:
                t = sample_t(k["timestep"], (n,))
            eps = jax.random.normal(k["noise"], x.shape, jnp.float32)
            dropped = drop_conditions(k["dropout"], cond, world.uncond, m.fake_cond_dropout)
            x_t = schedule.add_noise(x, eps, t)
            pred = predict_cfg(
                self.fake, self.fake_params(params), x_t, t, dropped, world.uncond, guidance, m.cfg_convention
            )
            # Over the rows whose sample and prediction are finite; the others are counted (one per noising).
            total, good = finite_denoising_loss(pred, x, eps, m.fake_target, m.fake_weighting, ok)
            metrics = {
                "finite_samples": jnp.mean(generated_ok.astype(jnp.float32)),
                NONFINITE_ROWS: nonfinite_count(good),
            }
            if discriminator is not None:
                gan, gan_metrics = discriminator.discriminator_loss(
                    params, batch, k["gan"], generated, generated_ok, carry
                )
                metrics = {**metrics, "denoising": total, **gan_metrics}
                total = total + gan
            return total, (metrics, carry)

        return loss

    def generator_update(self, loss: LossFn, passes: tuple[Pass, ...], every: int = 1) -> Update:
        """The student's update ("generator") that hands its sample sg(x) to the fake score's update of the same
        step (``Carry.generated``), every ``every`` steps."""
        return Update("generator", ("student",), loss, every=every, passes=passes, carries=("generated",))

    def fake_score_update(
        self,
        world,
        m: ml_collections.ConfigDict,
        *,
        guidance: float = 1.0,
        noise_draws: int = 1,
        discriminator: Discriminator | None = None,
        sample_t: TimeSampler | None = None,
    ) -> Update:
        """The fake score's update, every step: its denoising loss on sg(x), this step's generator sample when
        an earlier update carried it, else a fresh no-grad generation; conditions dropped with
        ``m.fake_cond_dropout``, the prediction under CFG ``guidance`` (SiD-LSG's kappa1), ``noise_draws``
        noisings per sample at t ~ U(m.fake_t_range) or ``sample_t(key, shape)``. Rows whose sample or
        prediction is not finite are left out of the denoising loss and counted (metric ``NONFINITE_ROWS``).
        With a ``discriminator`` its weighted loss on sg(x) and real samples is added and its head trains
        with the fake score, the trunk and head running on generated and real samples together."""
        loss = self._fake_score_loss(world, m, guidance, noise_draws, discriminator, sample_t)
        passes = self.fake_score_passes(m, guidance=guidance, noise_draws=noise_draws)
        trains: tuple[str, ...] = ("fake_score",)
        if discriminator is not None:
            trains += ("discriminator",)
            passes += (Pass(self.fake_net.name, 2.0, "params", trunk=True),)
        return Update("fake_score", trains, loss, passes=passes)

    def recipe(
        self,
        updates: tuple[Update, ...],
        data: Any = "conditions",
        discriminator: Discriminator | None = None,
    ) -> Recipe:
        extra = (discriminator.head,) if discriminator is not None else ()
        return Recipe(
            networks=(self.student_net, self.fake_net, *extra),
            updates=updates,
            sample=lambda params, cond, key: self.student.sample(self.student_params(params), cond, key),
            data=data,
            student_timesteps=self.student.timesteps,
            student_input_scale=self.student.input_scale,
        )


def cfg_evaluations(scale, convention: str, denoiser=None) -> int:
    """Network evaluations per sample of a prediction under CFG ``scale``: 1 when it is the identity or the
    ``denoiser`` takes the scale as an input (a guidance-distilled FLUX)."""
    if getattr(denoiser, "embedded_guidance", False):
        return 1
    return 1 if is_identity(scale, convention) else 2


def student_and_fake(
    config: ml_collections.ConfigDict,
    world,
    timesteps: tuple[float, ...],
    *,
    residual_prediction: str | None = None,
) -> StudentAndFake:
    """The networks ``student`` and ``fake_score`` of ``config.networks``.

    ``residual_prediction``: the fake score is a zero-initialised correction on the teacher in that
    parameterization (params = (teacher, fake_score)); otherwise it is the configured network alone.
    """
    schedule = world.teacher.schedule
    student_net = build_network("student", config.networks.student, world, config.num_steps)
    residual = residual_prediction is not None
    fake_net = build_network(
        "fake_score", config.networks.fake_score, world, config.num_steps, zero_out=residual
    )
    if residual:
        fake = ResidualDenoiser(world.teacher, fake_net.net, residual_prediction)

        def fake_params(params):
            return (params["teacher"], params["fake_score"])
    else:
        fake = network_denoiser(fake_net, config.networks.fake_score, schedule)

        fake_params = fake_net.net_params

    student = FewStepStudent(
        network_denoiser(student_net, config.networks.student, schedule),
        world.sample_shape,
        timesteps,
        config.method.get("student_input", "noise"),
    )
    return StudentAndFake(student_net, fake_net, student, fake, fake_params)
