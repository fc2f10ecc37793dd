"""``sid``: Score identity Distillation, with long-short guidance (SiD-LSG) and few-step students.

References: Zhou et al., "Score identity Distillation", ICML 2024 (arXiv 2404.04057, mingyuanzhou/SiD);
"Long and Short Guidance in Score identity Distillation" (SiD-LSG), ICLR 2025 (arXiv 2406.01561,
mingyuanzhou/SiD-LSG); few-step SiD (arXiv 2505.12674, apple-aiml-research/ml-sid-dit).

Per step (fake score first, then the generator, 1:1):

1. fake-score update: x = sg(G) at a uniformly drawn step of the student; t ~ U{0..999} (or, on a flow
   teacher, a logit-normal flow time: ``fake_t_sampling``); the fake score's
   prediction, under its own CFG of scale kappa1 (prompts dropped with probability ``fake_cond_dropout``),
   regressed to the truth (eps-MSE by default).
2. generator update: x = G (gradient through the last student step), t ~ U(t_range) (or logit-normal:
   ``t_sampling``),
   x_t = alpha_t x + sigma_t eps **without** stop-gradient; f_real = teacher x0 under CFG kappa4,
   f_fake = fake x0 under CFG kappa2 (or unconditional: Zero-CFG; negative kappa2: Anti-CFG);
   loss = mean_batch omega sum_CHW (f_real - f_fake)((f_real - x) - alpha (f_real - f_fake)) with
   omega = 1/sg(max(mean|x - f_real|, 1e-5)) (``generator_weighting`` "sid"), or on a flow teacher one of
   SiD-DiT's functions of the flow time (its default "1_minus_sigma": omega = 1 - t). Gradients reach the
   student directly and through the inputs of both frozen networks, never their parameters. Non-finite
   samples are masked out of the mean.

SiD-DiT (arXiv 2509.25127, apple-aiml-research/ml-sid-dit) on flow teachers: both networks' times
sigmoid(N(ln 2, 1.6^2)) (``*_t_sampling = "logit_normal"``), omega = 1 - t, four steps at t_i = 1 - i/4 with
fresh re-noising between them (``renoise``: only "fresh"; its "fixed" and "ddim" noises are not implemented).

With ``method.gan`` on (SiDA, arXiv 2410.14919; few-step SiD's diffusion GAN): a head on the fake score's
bottleneck features (``methods/adversarial.py``) classifies real and generated samples, logits clamped to
+-10; the fake update adds its weighted BCE on noised sg(x) and real data, and after ``gan.start_step`` the
generator's loss becomes 0.5 L_SiD + lambda_G mean(omega BCE(D(x_t), 1)) on the generator loss's own x_t.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.guidance import select_cond
from jdistill.diffusion.schedules import FlowSchedule
from jdistill.methods.adversarial import GAN_CHOICES, build_discriminator, enabled, gan_config
from jdistill.methods.distribution import (
    FLOW_TIME_WEIGHTINGS,
    GENERATOR_WEIGHTINGS,
    NONFINITE_ROWS,
    generator_weight,
    logit_normal_times,
    masked_mean,
    sid_generator_loss,
)
from jdistill.methods.recipe import JOINT, Pass, Recipe, Update
from jdistill.methods.score_distillation import cfg_evaluations, student_and_fake

NETWORKS = ("student", "fake_score")
OPTIONAL_NETWORKS = ("discriminator",)
FAKE_CONDITIONS = ("cond", "uncond")
TIME_SAMPLINGS = ("uniform", "logit_normal")
RENOISE = ("fresh",)
CONFIG_CHOICES = {
    **GAN_CHOICES,
    "method.fake_condition": FAKE_CONDITIONS,
    "method.generator_weighting": GENERATOR_WEIGHTINGS,
    "method.t_sampling": TIME_SAMPLINGS,
    "method.fake_t_sampling": TIME_SAMPLINGS,
    "method.renoise": RENOISE,
}


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "sid",
            "alpha": 1.2,  # SiD's alpha (1.2 for the EDM runs; SiD-LSG's scripts use 1.0)
            "cfg_convention": "uncond",
            "teacher_guidance": 1.0,  # kappa4: CFG of the teacher inside the generator loss
            "fake_guidance": 1.0,  # kappa2 = kappa3: CFG of the fake score inside the generator loss
            "fake_condition": "cond",  # "uncond": Zero-CFG (the fake score sees no prompt in the generator loss)
            "fake_train_guidance": 1.0,  # kappa1: CFG under which the fake score is trained
            "fake_cond_dropout": 0.0,  # prompt dropout when training the fake score (0.1 when any kappa != 1)
            "student_timesteps": (999.0,),  # schedule units; several: uniform mixture over step counts
            "student_input": "noise",  # z labelled t_0; "noised_zero": sigma_{t_0} z (SiD-LSG at t_0 = 625)
            "t_range": (
                0.02,
                0.98,
            ),  # generator-loss timesteps: U{20..980} (sid_lsg presets: 0.979, U{20..979})
            "fake_t_range": (0.0, 1.0),
            # "logit_normal" (flow teachers): t = sigmoid(N(mean, std^2)) with (mean, std) = *_t_logit_normal
            "t_sampling": "uniform",
            "t_logit_normal": (0.0, 1.0),
            "fake_t_sampling": "uniform",
            "fake_t_logit_normal": (0.0, 1.0),
            # the generator loss's per-sample weight: "sid" or a function of the flow time (GENERATOR_WEIGHTINGS)
            "generator_weighting": "sid",
            "renoise": "fresh",  # noise between a few-step student's steps: fresh draws (SiD-DiT's default)
            "fake_target": "eps",
            "fake_weighting": "uniform",
            # Off. SiDA: generator 0.5 (x loss_scaling_G_gan 0.01 in its code), main 0.5, clamp 10, warm-up.
            "gan": gan_config(main_weight=0.5, logit_clamp=10.0),
        }
    )


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    m = config.method
    if m.fake_condition not in FAKE_CONDITIONS:
        raise ValueError(f"method.fake_condition={m.fake_condition!r}; choose one of {FAKE_CONDITIONS}")
    teacher = world.teacher
    check_flow_settings(m, teacher.schedule)
    sample_t = time_sampler(m.t_sampling, m.t_logit_normal)
    sample_fake_t = time_sampler(m.fake_t_sampling, m.fake_t_logit_normal)
    parts = student_and_fake(config, world, m.student_timesteps)
    disc = build_discriminator(config, world, parts.fake_net) if enabled(m.gan) else None

    def generator_loss(params, batch, key, carry):
        cond = batch["cond"]
        # No stop-gradient on x_t: the generator's gradient flows through the frozen networks' inputs.
        x, ok, t, x_t = parts.noised_generation(params, cond, key, m.t_range, detach=False, sample_t=sample_t)
        n = x.shape[0]
        real = predict_cfg(
            teacher, params["teacher"], x_t, t, cond, world.uncond, m.teacher_guidance, m.cfg_convention
        )
        fake_cond = (
            cond if m.fake_condition == "cond" else select_cond(cond, world.uncond, jnp.ones((n,), bool))
        )
        fake_pred = predict_cfg(
            parts.fake,
            parts.fake_params(params),
            x_t,
            t,
            fake_cond,
            world.uncond,
            m.fake_guidance,
            m.cfg_convention,
        )
        weight = generator_weight(m.generator_weighting, x, real.x0, t)
        per_sample = sid_generator_loss(x, real.x0, fake_pred.x0, m.alpha, weight)
        loss, dropped = masked_mean(per_sample, ok)  # over the finite samples; the others are counted
        metrics = {"finite_samples": jnp.mean(ok.astype(jnp.float32)), NONFINITE_ROWS: dropped}
        if disc is not None:  # on the same x_t, weighted per sample by omega as SiD's own loss
            adversarial, gan_metrics = disc.generator_loss(params, x_t, t, cond, ok, weight)
            metrics = {**metrics, "sid": loss, **gan_metrics}
            loss = disc.combine(loss, adversarial, carry)
        return loss, (metrics, carry)

    # the generator's gradient reaches x through the frozen networks' inputs
    generator_passes = (
        *parts.generation_passes("params"),
        Pass("teacher", cfg_evaluations(m.teacher_guidance, m.cfg_convention, teacher), "input"),
        *parts.fake_passes(cfg_evaluations(m.fake_guidance, m.cfg_convention, parts.fake), "input"),
    )
    if disc is not None:  # the head's trunk on x_t in the generator loss
        generator_passes += (Pass(parts.fake_net.name, 1.0, "input", trunk=True),)
    return parts.recipe(
        (
            parts.fake_score_update(
                world, m, guidance=m.fake_train_guidance, discriminator=disc, sample_t=sample_fake_t
            ),
            Update("generator", ("student",), generator_loss, passes=generator_passes),
        ),
        data="conditions" if disc is None else JOINT,
        discriminator=disc,
    )


def check_flow_settings(m: ml_collections.ConfigDict, schedule) -> None:
    """Refuse, by name, settings that are not in the method's choices or that need a flow teacher (times in
    [0, 1] with sigma = t): the logit-normal times and the flow-time weightings."""
    choices = (
        ("generator_weighting", GENERATOR_WEIGHTINGS),
        ("t_sampling", TIME_SAMPLINGS),
        ("fake_t_sampling", TIME_SAMPLINGS),
        ("renoise", RENOISE),
    )
    for key, allowed in choices:
        if m[key] not in allowed:
            raise ValueError(f"method.{key}={m[key]!r}; choose one of {allowed}")
    for key in ("t_logit_normal", "fake_t_logit_normal"):
        if len(m[key]) != 2 or not m[key][1] > 0:
            raise ValueError(f"method.{key}={tuple(m[key])}; give (mean, std) with std > 0")
    if isinstance(schedule, FlowSchedule):
        return
    flow_only = (
        [f"generator_weighting={m.generator_weighting!r}"]
        if m.generator_weighting in FLOW_TIME_WEIGHTINGS
        else []
    )
    flow_only += [f"{k}='logit_normal'" for k in ("t_sampling", "fake_t_sampling") if m[k] == "logit_normal"]
    if flow_only:
        raise ValueError(
            f"method.{', method.'.join(flow_only)} need a flow-matching teacher (flow time t in [0, 1], sigma = t); "
            f"this teacher's schedule is {type(schedule).__name__}"
        )


def time_sampler(kind: str, logit_normal: tuple[float, float]):
    """None for the uniform range (the recipe's default), else (key, shape) -> logit-normal flow times."""
    if kind == "uniform":
        return None
    mean, std = (float(v) for v in logit_normal)
    return lambda key, shape: logit_normal_times(key, shape, mean, std)
