"""``scm``: continuous-time consistency distillation in TrigFlow (sCM).

Reference: Lu & Song, sCM (arXiv 2410.11081); the losses of SANA-Sprint (arXiv 2503.09641,
NVlabs/Sana train_scm_ladd.py) and T2I-Distill's train_sCM.py; docs/trajectory.md, sCM.

The teacher runs as a TrigFlow model whatever its own path (eps / v / flow teachers through
``diffusion.reparameterize``): at TrigFlow time t its x0 and eps give d x_t / dt = sigma_d F_teacher. Per step,
on real data x0 (times ``data_scale``, T2I-Distill: sigma_d) and conditions c:

1. tau ~ N(P_mean, P_std), t = arctan(e^tau / sigma_d); x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2).
2. dx/dt = sigma_d F_teacher(x_t, t; w), CFG w per sample from ``guidance_choices`` (convention "uncond"), no
   gradient; the student sees w through its guidance embedding when ``guidance_embed``.
3. (F-, dF-) = JVP of the student under stop-gradient along (cos t sin t dx/dt, cos t sin t) (``jvp``:
   forward mode, or central differences);
4. g = -cos^2 t (sigma_d F- - dx/dt) - r (cos t sin t x_t + sigma_d dF-), r = min(1, step / H),
   g / (|g| + 0.1);
5. loss = mean[ e^{-w(t)} / (sigma_d tan t) |F_theta - F- - g|^2 + w(t) ], w(t) the learned log-variance head
   (``networks.logvar``), trained with the student.

Samples: the student's x0 at each of ``student_timesteps`` (pi/2 first), re-noised with fresh noise between
them (SANA-Sprint's two steps: pi/2 and 1.3).

With ``method.gan`` on (SANA-Sprint's hybrid, L = L_sCM + lambda_adv L_adv, ``methods/adversarial.py``): LADD
heads (``networks.discriminator``) on feature maps of the frozen teacher, trained by a second update after the
student's, one step each per train step.

- generator (in the student update): on the real x0, times t_G from sCM's distribution, replaced by pi/2 with
  probability ``gan.max_time_prob`` (SANA-Sprint's train_largest_timestep: one-step quality), fresh noise,
  x0_G = cos t_G x_t - sin t_G sigma_d F_theta (the same student call as sCM's F_theta), re-noised at t_D and
  classified by the heads on the teacher's features; lambda_adv times the G loss (hinge: -mean D) is added,
  its gradient reaching the student through the frozen teacher, the heads held fixed.
- discriminator (heads only): sg(x0_G) from the student update, the real images and the real images with
  shifted prompts (misaligned pairs, extra fakes), each noised at its own t_D; hinge loss, plus an R1-style
  penalty on the heads' inputs (``gan.r1_weight``). The student is not touched.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.guidance import in_cond_convention
from jdistill.diffusion.jvp import JVP_METHODS, directional_derivative
from jdistill.diffusion.reparameterize import MatchedDenoiser, on_schedule, trigflow_output
from jdistill.diffusion.samplers import student_plan
from jdistill.diffusion.schedules import TrigFlowSchedule, broadcast_to
from jdistill.diffusion.transformer_denoiser import transformer_family
from jdistill.methods.adversarial import GAN_CHOICES, build_teacher_discriminator, enabled, ladd_config
from jdistill.methods.common import (
    build_network,
    network_denoiser,
    student_time_scale,
    with_transformer_options,
)
from jdistill.methods.distribution import NONFINITE_ROWS, finite_rows, nonfinite_count, zero_bad_rows
from jdistill.methods.recipe import Network, Pass, Recipe, Update, derivative_passes
from jdistill.methods.rollout import renoising_sampler
from jdistill.methods.trajectory import scm_loss, scm_tangent, trigflow_times, with_guidance
from jdistill.models.heads import LogVarHead
from jdistill.models.net import Net
from jdistill.optim import make_optimizer, optimizer_config
from jdistill.rng import stream, streams

NETWORKS = ("student", "logvar")
OPTIONAL_NETWORKS = ("discriminator",)
CONFIG_CHOICES = {**GAN_CHOICES, "method.jvp": JVP_METHODS, "networks.logvar.model.arch": ("logvar",)}


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "scm",
            "sigma_data": 0.5,
            "data_scale": 1.0,  # TrigFlow's data = the teacher's data times this (T2I-Distill: sigma_data)
            "p_mean": 0.2,
            "p_std": 1.6,
            "time_eps": 1e-3,  # t kept inside (eps, pi/2 - eps): tan t and the prior weight stay finite
            "tangent_warmup_steps": 4000,  # H
            "tangent_norm_c": 0.1,
            "jvp": "jvp",  # or "finite_difference" (networks with custom_vjp kernels)
            "jvp_step": 1e-3,
            "cfg_convention": "uncond",
            "guidance_choices": (
                4.0,
                4.5,
                5.0,
            ),  # w per sample, uniform over these (SANA-Sprint, T2I-Distill)
            "guidance_embed": False,  # the student takes w (needs networks.student.model.time_cond_proj_dim)
            "student_timesteps": (math.pi / 2,),  # e.g. (pi/2, 1.3) for two steps
            "sample_guidance": 4.5,
            # LADD; off. SANA-Sprint: generator_weight (lambda_adv) 0.5, discriminator_weight 0.5
            "gan": ladd_config(),
        }
    )


def logvar_config(lr: float = 1e-3, time_embed_dim: int = 128, time_scale: float = 1.0):
    """``networks.logvar``: the adaptive weighting head w(t) and its optimizer."""
    return ml_collections.ConfigDict(
        {
            "model": {"arch": "logvar", "time_embed_dim": time_embed_dim, "time_scale": time_scale},
            "optimizer": optimizer_config(lr),
            "ema_decay": 0.0,
            "init_from": "",
        }
    )


def trigflow_student(config, world, schedule: TrigFlowSchedule):
    """The student network and its denoiser on the TrigFlow path: a copy of the teacher (arch "teacher") keeps
    the teacher's parameterization and is wrapped the way the teacher is (a FLUX copy with the time scale of
    ``model.timestep_scale`` when set: T2I-Distill's x1 time and guidance inputs); any other network (an MLP
    from scratch) lives on the TrigFlow path itself."""
    net_cfg = config.networks.student
    family = transformer_family(world.nets.get("teacher")) if net_cfg.model.arch == "teacher" else None
    student_world = with_transformer_options(world, **student_time_scale(net_cfg.model, family))
    network = build_network("student", net_cfg, student_world, config.num_steps)
    if net_cfg.model.arch == "teacher":
        base = network_denoiser(network, net_cfg, world.teacher.schedule)
        return network, on_schedule(base, schedule, config.method.data_scale)
    return network, network_denoiser(network, net_cfg, schedule)


def adversarial_times(key: jax.Array, n: int, m: ml_collections.ConfigDict) -> jax.Array:
    """t_G of LADD's generator pass: sCM's training times, each replaced by pi/2 (pure noise: the one-step
    sampler's input) with probability ``m.gan.max_time_prob``."""
    k = streams(key, "time", "max_time")
    t = trigflow_times(k["time"], n, m.p_mean, m.p_std, m.sigma_data, m.time_eps)
    top = jax.random.bernoulli(k["max_time"], m.gan.max_time_prob, (n,))
    return jnp.where(top, jnp.float32(math.pi / 2), t)


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    m = config.method
    sigma_data = m.sigma_data
    schedule = TrigFlowSchedule(sigma_data=sigma_data)
    teacher = on_schedule(world.teacher, schedule, m.data_scale)
    network, student = trigflow_student(config, world, schedule)
    # The student's guidance input: a guidance-distilled FLUX copy has its own embedding (T2I-Distill feeds it
    # the teacher's w); a UNet gets LCM's (time_cond_proj_dim).
    embedded = m.guidance_embed and student.embedded_guidance
    guidance_dim = (
        config.networks.student.model.get("time_cond_proj_dim", 0) if m.guidance_embed and not embedded else 0
    )
    if m.guidance_embed and not (embedded or guidance_dim):
        raise ValueError(
            "method.guidance_embed needs a student with a guidance input: networks.student.model."
            "time_cond_proj_dim > 0 (a UNet) or a copy of a guidance-distilled FLUX (guidance_embeds)"
        )

    def student_inputs(cond, w):
        return with_guidance(
            cond, w, embedded=embedded, convention=m.cfg_convention, guidance_dim=guidance_dim
        )

    logvar_cfg = config.networks.logvar
    logvar_net = Network(
        Net(
            "logvar",
            lambda rngs: LogVarHead(
                time_embed_dim=logvar_cfg.model.time_embed_dim,
                time_scale=logvar_cfg.model.time_scale,
                rngs=rngs,
            ),
        ),
        make_optimizer(logvar_cfg.optimizer, config.num_steps),
        logvar_cfg.ema_decay,
    )
    choices = jnp.asarray(m.guidance_choices, jnp.float32)
    disc = build_teacher_discriminator(config, world, teacher, m.time_eps) if enabled(m.get("gan")) else None

    def output(p, x_t, t, cond):
        return trigflow_output(student.predict(p, x_t, t, cond), sigma_data)

    def loss(params, batch, key, carry):
        k = streams(key, "time", "noise", "guidance")
        x0 = m.data_scale * batch["x0"].astype(jnp.float32)
        cond = batch["cond"]
        n = x0.shape[0]
        t = trigflow_times(k["time"], n, m.p_mean, m.p_std, sigma_data, m.time_eps)
        x_t = schedule.add_noise(x0, jax.random.normal(k["noise"], x0.shape, jnp.float32), t)
        w = choices[jax.random.randint(k["guidance"], (n,), 0, len(m.guidance_choices))]
        guided = predict_cfg(teacher, params["teacher"], x_t, t, cond, world.uncond, w, m.cfg_convention)
        dxdt = jax.lax.stop_gradient(guided.velocity)
        student_cond = student_inputs(cond, w)
        own = network.net_params(params)
        frozen = jax.lax.stop_gradient(own)
        cos_sin = jnp.cos(t) * jnp.sin(t)
        f_minus, df_minus = directional_derivative(
            lambda x, s: output(frozen, x, s, student_cond),
            (x_t, t),
            (broadcast_to(cos_sin, dxdt) * dxdt, cos_sin),
            method=m.jvp,
            step=m.jvp_step,
        )
        warmup = jnp.minimum(1.0, carry.step / max(m.tangent_warmup_steps, 1))
        g = scm_tangent(f_minus, df_minus, dxdt, x_t, t, sigma_data, warmup, m.tangent_norm_c)
        g = jax.lax.stop_gradient(g)
        if disc is None:
            f_theta = output(own, x_t, t, student_cond)
        else:  # LADD's generator pass on the real x0 at its own times, in the same student call
            k_adv = streams(key, "adversarial_time", "adversarial_noise")
            t_adv = adversarial_times(k_adv["adversarial_time"], n, m)
            noise = jax.random.normal(k_adv["adversarial_noise"], x0.shape, jnp.float32)
            x_adv = schedule.add_noise(x0, noise, t_adv)
            pair = jax.tree.map(lambda c: jnp.concatenate([c, c]), student_cond)
            pred = student.predict(own, jnp.concatenate([x_t, x_adv]), jnp.concatenate([t, t_adv]), pair)
            f_theta = trigflow_output(pred, sigma_data)[:n]
            x0_adv = pred.x0[n:]  # cos t x_t - sin t sigma_d F_theta
        logvar = logvar_net.net.apply(params["logvar"], t)
        value = scm_loss(f_theta, jax.lax.stop_gradient(f_minus), g, t, logvar, sigma_data)
        metrics = {"tangent_norm": jnp.mean(jnp.abs(g)), "logvar": jnp.mean(logvar)}
        if disc is None:
            return value, (metrics, carry)
        ok = finite_rows(x0_adv)  # the heads' losses leave the other samples out; counted here
        x0_adv = zero_bad_rows(x0_adv, ok)
        adversarial, gan_metrics = disc.generator_loss(params, x0_adv, cond, stream(key, "gan"), ok)
        metrics = {**metrics, "scm": value, **gan_metrics, NONFINITE_ROWS: nonfinite_count(ok)}
        carry = carry.replace(generated=jax.lax.stop_gradient(x0_adv), generated_ok=ok)
        return disc.combine(value, adversarial, carry), (metrics, carry)

    def discriminator_loss(params, batch, key, carry):
        """The heads' update on this step's sg(x0_G) (carried from the student update) and the real batch."""
        real = {"x0": m.data_scale * batch["x0"].astype(jnp.float32), "cond": batch["cond"]}
        total, metrics = disc.discriminator_loss(
            params, carry.generated, carry.generated_ok, real, key, carry
        )
        return total, ({**metrics, NONFINITE_ROWS: nonfinite_count(carry.generated_ok)}, carry)

    plan = student_plan(schedule, tuple(m.student_timesteps))

    scaled = renoising_sampler(
        student.predict,
        plan,
        schedule,
        world.sample_shape,
        network.net_params,
        student_cond=lambda c: student_inputs(c, m.sample_guidance),
    )

    def sample(params, cond, key):
        return scaled(params, cond, key) / m.data_scale

    # The teacher's guided pair (w drawn per sample; one pass for a guidance-distilled FLUX), the JVP of
    # sg(student), and the differentiated student (with LADD: on x_t and the real x_adv in one call, then the
    # teacher's trunk under the heads).
    passes = (
        Pass("teacher", 1.0 if getattr(teacher, "embedded_guidance", False) else 2.0),
        *derivative_passes("student", m.jvp),
        Pass("student", 1.0 if disc is None else 2.0, "params"),
    )
    if disc is not None:
        passes += (Pass("teacher", 1.0, "input", trunk=True),)
    carries = ("generated", "generated_ok") if disc is not None else ()
    updates = (Update("student", ("student", "logvar"), loss, passes=passes, carries=carries),)
    if disc is not None:  # after the student's: it reads the student's x0 from the carry
        groups = 3.0 if m.gan.misaligned else 2.0  # fake, (misaligned,) real: one trunk pass, no gradient
        heads = (Pass("teacher", groups, trunk=True),)
        updates += (Update("discriminator", ("discriminator",), discriminator_loss, passes=heads),)
    times = tuple(float(t) for t in m.student_timesteps)
    on_flow_transformer = transformer_family(network.net) is not None
    return Recipe(
        networks=(network, logvar_net) + ((disc.heads,) if disc is not None else ()),
        updates=updates,
        sample=sample,
        data="data",
        student_timesteps=times,
        # A guidance-embedding FLUX student samples with sample_guidance, as w in convention "cond".
        student_guidance=in_cond_convention(m.sample_guidance, m.cfg_convention) if embedded else None,
        flow_times=flow_times(student, times) if on_flow_transformer else (),
        no_diffusers_export=""
        if on_flow_transformer
        else "the student samples on the TrigFlow path (times in [0, pi/2]), which no diffusers scheduler of a "
        "UNet pipeline reproduces; use --mode sample, or the flat export of a gmm run",
    )


def flow_times(student: MatchedDenoiser, times: tuple[float, ...]) -> tuple[float, ...]:
    """A flow-teacher copy's TrigFlow sampler as flow-path steps: each TrigFlow time t is the flow time s with
    the same noise-to-data ratio (s / (1 - s) = sigma_d tan t / data_scale), and a TrigFlow point is a scaled
    flow point with the same x0 and unit noise, so predicting x0 and re-noising at t' is doing so at s'
    (FlowMatchEulerDiscreteScheduler's stochastic sampling). pi/2 maps to 1 (float32 cos(pi/2) is not 0)."""
    alpha, sigma = student.schedule.alpha_sigma(jnp.asarray(times, jnp.float32))
    s = np.asarray(student.base_time(alpha, sigma), np.float64)
    return tuple(1.0 if abs(v - 1.0) < 1e-6 else float(v) for v in s)
