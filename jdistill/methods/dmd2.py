"""``dmd2``: distribution matching with a two time-scale fake score, no regression loss (DMD2).

Reference: Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024
(arXiv 2405.14867), official code tianweiy/DMD2 (``main/sd_guidance.py``, ``main/sd_unified_model.py``).

Per step, on one batch of conditions:

1. generator update (student only; every ``generator_every`` steps, DMD2's TTUR ratio): x = G at a step
   index drawn uniformly (backward simulation for multi-step students; pure noise at t_0 for one step);
   t ~ U{20..980}; x_t = alpha_t sg(x) + sigma_t eps; under stop-gradient, x0_real with CFG of scale w
   (convention y_u + w (y_c - y_u)) and x0_fake without guidance; g = (x0_fake - x0_real) / mean|x - x0_real|
   (per sample, float32); loss 0.5 mean((x - sg(x - g))^2) over the samples with finite x and g (the others
   are counted in the metric nonfinite_rows).
2. fake-score update (every step): on sg(x) from this step's generator (or a fresh no-grad generation on
   fake-only steps), t ~ U{0..999}, denoising loss (eps-MSE, uniform weight, no guidance).

With ``method.gan`` on (DMD2's stage 2 and SDXL runs): a head on the fake score's bottleneck features
classifies noised real and generated samples (``methods/adversarial.py``). The fake update trains the fake
score and the head on denoising + lambda_D softplus-BCE (sg(x) vs real data); the generator adds
lambda_G softplus(-D(x_t')) with x_t' noised from x itself, fake score and head frozen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.methods.adversarial import GAN_CHOICES, build_discriminator, enabled, gan_config
from jdistill.methods.distribution import (
    NONFINITE_ROWS,
    dmd_direction,
    finite_mean,
    finite_pseudo_target_loss,
    nonfinite_count,
)
from jdistill.methods.recipe import JOINT, Pass, Recipe
from jdistill.methods.score_distillation import cfg_evaluations, student_and_fake
from jdistill.rng import stream

NETWORKS = ("student", "fake_score")
OPTIONAL_NETWORKS = ("discriminator",)
CONFIG_CHOICES = GAN_CHOICES


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "dmd2",
            "guidance_scale": 1.75,  # real score only (SD1.5 setting); the fake score runs without guidance
            "cfg_convention": "uncond",
            "student_timesteps": (999.0,),  # schedule units; e.g. (999, 749, 499, 249) for 4 steps
            "student_input": "noise",  # z labelled t_0; "noised_zero": sigma_{t_0} z (SiD-LSG at t_0 = 625)
            "t_range": (0.02, 0.98),  # distribution-matching timesteps: U{20..980}
            "fake_t_range": (0.0, 1.0),
            "fake_target": "eps",
            "fake_weighting": "uniform",
            "fake_cond_dropout": 0.0,
            "generator_every": 10,  # fake-score updates per generator update (10 SD1.5, 5 SDXL)
            "gan": gan_config(),  # off; DMD2 SD1.5 stage 2: generator 1e-3, discriminator 1e-2
        }
    )


def distribution_matching(config: ml_collections.ConfigDict, world):
    """What DMD and DMD2 share: the student and fake score, the discriminator when ``method.gan`` is on
    (else None), and the distribution-matching generator loss (plus the GAN term)."""
    m = config.method
    teacher = world.teacher
    parts = student_and_fake(config, world, m.student_timesteps)
    disc = build_discriminator(config, world, parts.fake_net) if enabled(m.get("gan")) else None

    def generator_loss(params, batch, key, carry):
        cond = batch["cond"]
        x, ok, t, x_t = parts.noised_generation(params, cond, key, m.t_range, detach=True)
        real = predict_cfg(
            teacher, params["teacher"], x_t, t, cond, world.uncond, m.guidance_scale, m.cfg_convention
        )
        fake_x0 = parts.fake.predict(parts.fake_params(params), x_t, t, cond).x0  # no guidance
        g = dmd_direction(x, real.x0, fake_x0)
        loss, good = finite_pseudo_target_loss(x, g, ok)  # non-finite samples left out and counted
        metrics = {"direction_norm": finite_mean(jnp.abs(g), good), NONFINITE_ROWS: nonfinite_count(good)}
        if disc is not None:  # through x itself: the GAN's gradient is not stop-gradiented
            x_gan, t_gan = disc.noised(stream(key, "gan"), x)
            adversarial, gan_metrics = disc.generator_loss(params, x_gan, t_gan, cond, ok)
            metrics = {**metrics, "distribution_matching": loss, **gan_metrics}
            loss = disc.combine(loss, adversarial, carry)
        return loss, (metrics, carry.replace(generated=jax.lax.stop_gradient(x)))

    passes = (
        *parts.generation_passes("params"),
        Pass("teacher", cfg_evaluations(m.guidance_scale, m.cfg_convention, teacher)),
        *parts.fake_passes(1.0, "none"),
    )
    if disc is not None:  # the head's trunk on x_t' noised from x: the gradient flows through its input
        passes += (Pass(parts.fake_net.name, 1.0, "input", trunk=True),)
    return parts, disc, generator_loss, passes


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    parts, disc, generator_loss, passes = distribution_matching(config, world)
    return parts.recipe(
        (
            parts.generator_update(generator_loss, passes, every=config.method.generator_every),
            parts.fake_score_update(world, config.method, discriminator=disc),
        ),
        data="conditions" if disc is None else JOINT,
        discriminator=disc,
    )
