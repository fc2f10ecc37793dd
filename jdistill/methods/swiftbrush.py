"""``swiftbrush``: variational score distillation with a fake score trained online (SwiftBrush v1).

Reference: Nguyen & Tran, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
Distillation", CVPR 2024 (arXiv 2312.05239), official code VinAIResearch/SwiftBrush.

Per step, on one batch of conditions:

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
from jdistill.methods.distribution import (
    NONFINITE_ROWS,
    finite_mean,
    finite_pseudo_target_loss,
    nonfinite_count,
)
from jdistill.methods.recipe import Pass, Recipe
from jdistill.methods.score_distillation import cfg_evaluations, student_and_fake

FAKE_SCORE_INITS = ("teacher_residual", "network")


NETWORKS = ("student", "fake_score")
CONFIG_CHOICES = {"method.fake_score_init": FAKE_SCORE_INITS}


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "swiftbrush",
            "guidance_scale": 4.5,
            "cfg_convention": "uncond",
            "student_timestep": 999.0,  # schedule units: the noise level the one-step student starts from
            "student_input": "noise",  # z labelled t_0; "noised_zero": sigma_{t_0} z (SiD-LSG at t_0 = 625)
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
    teacher = world.teacher
    residual = config.networks.fake_score.prediction if m.fake_score_init == "teacher_residual" else None
    parts = student_and_fake(config, world, (m.student_timestep,), residual_prediction=residual)

    def generator_loss(params, batch, key, carry):
        cond = batch["cond"]
        x, ok, t, x_t = parts.noised_generation(params, cond, key, m.t_range, detach=True)
        real = predict_cfg(
            teacher, params["teacher"], x_t, t, cond, world.uncond, m.guidance_scale, m.cfg_convention
        )
        fake_pred = predict_cfg(
            parts.fake,
            parts.fake_params(params),
            x_t,
            t,
            cond,
            world.uncond,
            m.guidance_scale,
            m.cfg_convention,
        )
        g = jax.lax.stop_gradient(real.sigma**2 * (real.eps - fake_pred.eps))
        # Samples with a non-finite x or direction are left out of the loss and counted.
        loss, good = finite_pseudo_target_loss(x, g, ok)
        metrics = {"direction_norm": finite_mean(jnp.abs(g), good), NONFINITE_ROWS: nonfinite_count(good)}
        return loss, (metrics, carry.replace(generated=jax.lax.stop_gradient(x)))

    generator_passes = (
        *parts.generation_passes("params"),
        Pass("teacher", cfg_evaluations(m.guidance_scale, m.cfg_convention, teacher)),
        *parts.fake_passes(cfg_evaluations(m.guidance_scale, m.cfg_convention, parts.fake), "none"),
    )
    return parts.recipe(
        (
            parts.generator_update(generator_loss, generator_passes, every=m.generator_every),
            parts.fake_score_update(world, m, noise_draws=m.fake_noise_draws),
        )
    )
