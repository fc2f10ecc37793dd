"""``swiftbrush``: variational score distillation with a fake score trained online (SwiftBrush v1).

Reference: Nguyen & Tran, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
Distillation", CVPR 2024 (arXiv 2312.05239), official code VinAIResearch/SwiftBrush.

Per step, on one batch of conditions (../shared/reference/methods.md section 1.1):

1. generator update (student only): x = G(z, c); t ~ U{20..980}; x_t = alpha_t sg(x) + sigma_t eps;
   g = sg(sigma_t^2 (eps_teacher^w - eps_fake^w)) with classifier-free guidance of scale w on both the
   teacher and the fake score (convention y_u + w (y_c - y_u)); loss 0.5 mean((x - sg(x - g))^2).
2. fake-score update (fake score only) on the same sg(x): t ~ U{0..999}, condition dropped with
   probability 0.1, loss mean(alpha_t^2 |eps_fake(x_t) - eps|^2).

The fake score starts equal to the teacher: a LoRA on the teacher in the paper, here a zero-initialised
residual on the teacher ("teacher_residual"), or the network configured in ``networks.fake_score`` itself
("network": e.g. a copy of the teacher with ``model.init = "teacher"``, as DMD2 does, or an MLP from scratch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.schedules import sample_timesteps
from jdistill.methods.common import (
    ResidualDenoiser,
    build_network,
    denoising_loss,
    drop_conditions,
    network_denoiser,
    pseudo_target_loss,
)
from jdistill.methods.recipe import Recipe, Update
from jdistill.methods.rollout import FewStepStudent
from jdistill.rng import streams

FAKE_SCORE_INITS = ("teacher_residual", "network")


NETWORKS = ("student", "fake_score")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "swiftbrush",
            "guidance_scale": 4.5,
            "cfg_convention": "uncond",
            "student_timestep": 999.0,  # schedule units: the noise level the one-step student starts from
            "t_range": (0.02, 0.98),  # VSD timesteps as a fraction of the schedule: U{20..980}
            "fake_t_range": (0.0, 1.0),
            "fake_cond_dropout": 0.1,
            "fake_target": "eps",
            "fake_weighting": "alpha2",
            "fake_score_init": "teacher_residual",
            "generator_every": 1,  # the paper updates both networks every step; >1 is DMD2-style TTUR
            "fake_noise_draws": 1,  # (t, eps) draws per generated sample in the fake-score loss
        }
    )


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    m = config.method
    if m.fake_score_init not in FAKE_SCORE_INITS:
        raise ValueError(
            f"method.fake_score_init: unknown {m.fake_score_init!r}; choose one of {FAKE_SCORE_INITS}"
        )
    schedule = world.teacher.schedule
    teacher = world.teacher
    residual = m.fake_score_init == "teacher_residual"

    student_net = build_network("student", config.networks.student, world, config.num_steps)
    fake_net = build_network(
        "fake_score", config.networks.fake_score, world, config.num_steps, zero_out=residual
    )
    if residual:
        fake = ResidualDenoiser(teacher, fake_net.net, config.networks.fake_score.prediction)

        def fake_params(params):
            return (params["teacher"], params["fake_score"])
    else:
        fake = network_denoiser(fake_net, config.networks.fake_score, schedule)

        def fake_params(params):
            return params["fake_score"]

    student = FewStepStudent(
        network_denoiser(student_net, config.networks.student, schedule),
        world.sample_shape,
        (m.student_timestep,),
    )

    def generator_loss(params, batch, key, carry):
        k = streams(key, "generate", "timestep", "noise")
        cond = batch["cond"]
        x = student.generate(params["student"], cond, k["generate"])
        n = x.shape[0]
        t = sample_timesteps(schedule, k["timestep"], (n,), *m.t_range)
        eps = jax.random.normal(k["noise"], x.shape, jnp.float32)
        x_t = schedule.add_noise(jax.lax.stop_gradient(x), eps, t)
        real = predict_cfg(
            teacher, params["teacher"], x_t, t, cond, world.uncond, m.guidance_scale, m.cfg_convention
        )
        fake_pred = predict_cfg(
            fake, fake_params(params), x_t, t, cond, world.uncond, m.guidance_scale, m.cfg_convention
        )
        g = jax.lax.stop_gradient(jnp.nan_to_num(real.sigma**2 * (real.eps - fake_pred.eps)))
        metrics = {"direction_norm": jnp.mean(jnp.abs(g))}
        return pseudo_target_loss(x, g), (metrics, {"x": jax.lax.stop_gradient(x)})

    def fake_score_loss(params, batch, key, carry):
        k = streams(key, "generate", "timestep", "noise", "dropout")
        cond = batch["cond"]
        x = (
            carry["x"]
            if "x" in carry
            else jax.lax.stop_gradient(student.generate(params["student"], cond, k["generate"]))
        )
        if m.fake_noise_draws > 1:  # variance reduction: several noisings of each generated sample
            x = jnp.concatenate([x] * m.fake_noise_draws)
            cond = jax.tree.map(lambda c: jnp.concatenate([c] * m.fake_noise_draws), cond)
        n = x.shape[0]
        t = sample_timesteps(schedule, k["timestep"], (n,), *m.fake_t_range)
        eps = jax.random.normal(k["noise"], x.shape, jnp.float32)
        dropped = drop_conditions(k["dropout"], cond, world.uncond, m.fake_cond_dropout)
        pred = fake.predict(fake_params(params), schedule.add_noise(x, eps, t), t, dropped)
        return denoising_loss(pred, x, eps, m.fake_target, m.fake_weighting), ({}, carry)

    return Recipe(
        networks=(student_net, fake_net),
        updates=(
            Update("generator", ("student",), generator_loss, every=m.generator_every),
            Update("fake_score", ("fake_score",), fake_score_loss),
        ),
        sample=lambda params, cond, key: student.sample(params["student"], cond, key),
        data="conditions",
        student_timesteps=student.timesteps,
    )
