"""``lcm``: latent consistency distillation (LCM) and LCM-LoRA.

Reference: Luo et al., Latent Consistency Models (arXiv 2310.04378), LCM-LoRA (arXiv 2311.05556); the
training scripts of luosiallen/latent-consistency-model (= diffusers' train_lcm_distill_*); methods.md 4.1.

One update per step, on real data (x0, c):

1. skipping-step DDIM grid {19, 39, ..., 999} (``num_ddim_timesteps`` of the schedule): index n uniform,
   t = grid[n], s = t - 1000/50 (0 at the first point); x_t = alpha_t x0 + sigma_t eps.
2. guidance w ~ U[w_min, w_max] per sample in LCM's convention y_c + w (y_c - y_u); the student sees it
   through the guidance-scale embedding (``timestep_cond``, sinusoids of 1000 w) when ``guidance_embed``.
3. teacher one DDIM step with guided x0 and eps: x_s = alpha_s x0^w + sigma_s eps^w (no gradient).
4. f(x, t) = c_skip(t) x + c_out(t) x0_student(x, t) with c_skip = sd^2 / ((10 t)^2 + sd^2),
   c_out = 10 t / sqrt((10 t)^2 + sd^2); target f_target(x_s, s) under stop-gradient, where the target
   network is the student's EMA (decay 0.95 after every step, ``target_network = "ema"``), or the online student
   itself (LCM-LoRA: ``target_network = "online"``).
5. loss = mean(sqrt((f(x_t, t) - target)^2 + c^2) - c), pseudo-Huber c = 1e-3 (0: L2).

Sampling is LCM's multistep sampler: f at each of ``student_timesteps``, re-noised with fresh noise to the
next one; guidance ``sample_guidance`` through the embedding (diffusers' pipeline takes guidance_scale = w + 1).
A student with the teacher's UNet exports to a diffusers pipeline with diffusers' LCMScheduler (the same
boundary scalings) and, with the embedding, guidance_scale = sample_guidance + 1 in the recorded call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.samplers import run_sampler, student_plan
from jdistill.diffusion.schedules import VPSchedule, broadcast_to
from jdistill.methods.common import build_network, network_denoiser
from jdistill.methods.recipe import Pass, Recipe, Update
from jdistill.methods.rollout import sampler_noise
from jdistill.methods.trajectory import consistency_scalings, huber_loss, skipping_grid, with_student_inputs
from jdistill.rng import streams

NETWORKS = ("student",)
TARGETS = ("ema", "online")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "lcm",
            "cfg_convention": "cond",  # y_c + w (y_c - y_u), as LCM's scripts
            "guidance_range": (5.0, 15.0),  # w ~ U[w_min, w_max]; LCM-LoRA: a fixed w (both equal)
            "guidance_embed": True,  # the student takes w (needs networks.student.model.time_cond_proj_dim)
            "num_ddim_timesteps": 50,
            "huber_c": 1e-3,
            "sigma_data": 0.5,
            "timestep_scaling": 10.0,
            "target_network": "ema",  # the target network: the student's EMA ("ema"), or sg(student) ("online")
            "student_timesteps": (999.0,),  # the sampler's steps; e.g. (999, 499) for two
            "sample_guidance": 7.5,  # w of the sampler (convention "cond")
        }
    )


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    m = config.method
    schedule = world.teacher.schedule
    if not isinstance(schedule, VPSchedule):
        raise ValueError("lcm distils teachers on a VP (DDPM) schedule; this teacher's is not one")
    if m.target_network not in TARGETS:
        raise ValueError(f"method.target_network: unknown {m.target_network!r}; choose one of {TARGETS}")
    net_cfg = config.networks.student
    if m.target_network == "ema" and not net_cfg.ema_decay > 0:
        raise ValueError("method.target_network='ema' needs networks.student.ema_decay > 0 (LCM: 0.95)")
    guidance_dim = net_cfg.model.get("time_cond_proj_dim", 0) if m.guidance_embed else 0
    if m.guidance_embed and not guidance_dim:
        raise ValueError(
            "method.guidance_embed needs a student with a guidance input: set "
            "networks.student.model.time_cond_proj_dim (LCM: 256), or guidance_embed=False (LCM-LoRA)"
        )
    w_min, w_max = m.guidance_range
    teacher = world.teacher
    network = build_network("student", net_cfg, world, config.num_steps)
    student = network_denoiser(network, net_cfg, schedule)
    grid = skipping_grid(schedule.num_train_timesteps, m.num_ddim_timesteps)
    skip = schedule.num_train_timesteps // m.num_ddim_timesteps

    def consistency(params, x_t, t, cond):
        """f(x_t, t) = c_skip x_t + c_out x0_student(x_t, t)."""
        c_skip, c_out = consistency_scalings(t, m.sigma_data, m.timestep_scaling)
        x0 = student.predict(params, x_t, t, cond).x0
        return broadcast_to(c_skip, x_t) * x_t.astype(jnp.float32) + broadcast_to(c_out, x0) * x0

    def target_params(params):
        if m.target_network == "ema":
            return network.net_params({**params, "student": params["student_ema"]})
        return jax.lax.stop_gradient(network.net_params(params))

    def loss(params, batch, key, carry):
        k = streams(key, "index", "noise", "guidance")
        x0, cond = batch["x0"], batch["cond"]
        n = x0.shape[0]
        t = grid[jax.random.randint(k["index"], (n,), 0, m.num_ddim_timesteps)]
        s = jnp.maximum(t - skip, 0)
        eps = jax.random.normal(k["noise"], x0.shape, jnp.float32)
        x_t = schedule.add_noise(x0.astype(jnp.float32), eps, t)
        w = jax.random.uniform(k["guidance"], (n,), jnp.float32, w_min, w_max)
        student_cond = with_student_inputs(cond, guidance=w, guidance_dim=guidance_dim)

        guided = predict_cfg(teacher, params["teacher"], x_t, t, cond, world.uncond, w, m.cfg_convention)
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        x_s = jax.lax.stop_gradient(
            broadcast_to(alpha_s, x_t) * guided.x0 + broadcast_to(sigma_s, x_t) * guided.eps
        )
        target = jax.lax.stop_gradient(consistency(target_params(params), x_s, s, student_cond))
        out = consistency(network.net_params(params), x_t, t, student_cond)
        value = huber_loss(out, target, m.huber_c)
        return value, ({"target_distance": jnp.mean(jnp.abs(out - target))}, carry)

    plan = student_plan(schedule, tuple(m.student_timesteps))

    def sample(params, cond, key):
        n = jax.tree.leaves(cond)[0].shape[0]
        z, renoise = sampler_noise(key, schedule, (n, *world.sample_shape))
        student_cond = with_student_inputs(cond, guidance=m.sample_guidance, guidance_dim=guidance_dim)
        p = network.net_params(params)

        def denoise(x_t, t):
            pred = student.predict(p, x_t, t, student_cond)
            return pred.replace(x0=consistency(p, x_t, t, student_cond))

        return run_sampler(denoise, z, plan, renoise=True, key=renoise)

    return Recipe(
        networks=(network,),
        # The teacher's guided pair (w is drawn per sample: always two passes), the target network (EMA or
        # sg(student), the student's architecture) and the differentiated student.
        updates=(
            Update(
                "student",
                ("student",),
                loss,
                passes=(Pass("teacher", 2.0), Pass("student"), Pass("student", 1.0, "params")),
            ),
        ),
        sample=sample,
        data="data",
        student_timesteps=tuple(float(t) for t in m.student_timesteps),
        consistency_boundary=(float(m.sigma_data), float(m.timestep_scaling)),
        student_guidance=float(m.sample_guidance) if guidance_dim else None,
    )
