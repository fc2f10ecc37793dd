"""``dmd2``: distribution matching with a two time-scale fake score, no regression loss (DMD2).

Reference: Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024
(arXiv 2405.14867), official code tianweiy/DMD2 (``main/sd_guidance.py``, ``main/sd_unified_model.py``);
../shared/reference/methods.md section 2.2.

Per step, on one batch of conditions:

1. generator update (student only; every ``generator_every`` steps, DMD2's TTUR ratio): x = G at a step
   index drawn uniformly (backward simulation for multi-step students; pure noise at t_0 for one step);
   t ~ U{20..980}; x_t = alpha_t sg(x) + sigma_t eps; under stop-gradient, x0_real with CFG of scale w
   (convention y_u + w (y_c - y_u)) and x0_fake without guidance; g = (x0_fake - x0_real) / mean|x - x0_real|
   (per sample, float32, NaN-safe); loss 0.5 mean((x - sg(x - g))^2).
2. fake-score update (every step): on sg(x) from this step's generator (or a fresh no-grad generation on
   fake-only steps), t ~ U{0..999}, denoising loss (eps-MSE, uniform weight, no guidance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.methods.common import pseudo_target_loss
from jdistill.methods.distribution import dmd_direction
from jdistill.methods.recipe import Recipe, Update
from jdistill.methods.score_distillation import student_and_fake

NETWORKS = ("student", "fake_score")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "dmd2",
            "guidance_scale": 1.75,  # real score only (SD1.5 setting); the fake score runs without guidance
            "cfg_convention": "uncond",
            "student_timesteps": (999.0,),  # schedule units; e.g. (999, 749, 499, 249) for 4 steps
            "t_range": (0.02, 0.98),  # distribution-matching timesteps: U{20..980}
            "fake_t_range": (0.0, 1.0),
            "fake_target": "eps",
            "fake_weighting": "uniform",
            "fake_cond_dropout": 0.0,
            "generator_every": 10,  # fake-score updates per generator update (10 SD1.5, 5 SDXL)
        }
    )


def distribution_matching(config: ml_collections.ConfigDict, world):
    """What DMD and DMD2 share: the student and fake score, and the distribution-matching generator loss."""
    m = config.method
    teacher = world.teacher
    parts = student_and_fake(config, world, m.student_timesteps)

    def generator_loss(params, batch, key, carry):
        cond = batch["cond"]
        x, _, t, x_t = parts.noised_generation(params, cond, key, m.t_range, detach=True)
        real = predict_cfg(
            teacher, params["teacher"], x_t, t, cond, world.uncond, m.guidance_scale, m.cfg_convention
        )
        fake_x0 = parts.fake.predict(parts.fake_params(params), x_t, t, cond).x0  # no guidance
        g = dmd_direction(x, real.x0, fake_x0)
        metrics = {"direction_norm": jnp.mean(jnp.abs(g))}
        return pseudo_target_loss(x, g), (metrics, {"x": jax.lax.stop_gradient(x)})

    return parts, generator_loss


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    parts, generator_loss = distribution_matching(config, world)
    return parts.recipe(
        (
            Update("generator", ("student",), generator_loss, every=config.method.generator_every),
            Update("fake_score", ("fake_score",), parts.fake_score_loss(world, config.method)),
        )
    )
