"""``lcm``: latent consistency distillation (LCM) and LCM-LoRA, on VP (DDPM) and rectified-flow teachers.

Reference: Luo et al., Latent Consistency Models (arXiv 2310.04378), LCM-LoRA (arXiv 2311.05556); the
training scripts of luosiallen/latent-consistency-model (= diffusers' train_lcm_distill_*); notes:
docs/trajectory.md, LCM.

One update per step, on real data (x0, c):

1. skipping-step DDIM grid {19, 39, ..., 999} (``num_ddim_timesteps`` of the schedule): index n uniform,
   t = grid[n], s = t - 1000/50 (0 at the first point); x_t = alpha_t x0 + sigma_t eps.
2. guidance w ~ U[w_min, w_max] per sample in LCM's convention y_c + w (y_c - y_u); the student sees it
   through the guidance-scale embedding (``timestep_cond``, sinusoids of 1000 w) when ``guidance_embed``.
3. teacher one DDIM step with guided x0 and eps: x_s = alpha_s x0^w + sigma_s eps^w (no gradient).
4. f(x, t) = c_skip(t) x + c_out(t) x0_student(x, t) with c_skip = sigma_d^2 / ((10 t)^2 + sigma_d^2),
   c_out = 10 t / sqrt((10 t)^2 + sigma_d^2); target f_target(x_s, s) under stop-gradient, where the target
   network is the student's EMA (decay 0.95 after every step, ``target_network = "ema"``), or the online student
   itself (LCM-LoRA: ``target_network = "online"``).
5. loss = mean(sqrt((f(x_t, t) - target)^2 + c^2) - c), pseudo-Huber c = 1e-3 (0: L2).

Sampling is LCM's multistep sampler: f at each of ``student_timesteps``, re-noised with fresh noise to the
next one; guidance ``sample_guidance`` through the embedding (diffusers' pipeline takes guidance_scale = w + 1).
A student with the teacher's UNet exports to a diffusers pipeline with diffusers' LCMScheduler (the same
boundary scalings) and, with the embedding, guidance_scale = sample_guidance + 1 in the recorded call.

Flow-matching teachers (``FlowSchedule``: FLUX, SD3, the rectified-flow gmm teacher; t in [0, 1],
x_t = (1 - t) x0 + t eps, velocity v = eps - x0). The same update with the flow analogue of each piece:

1. grid: N = ``num_ddim_timesteps`` points u_j = j / N (j = 1..N) uniform in unshifted time, then shifted as the
   teacher's sampler shifts its sigmas, t_j = shift u_j / (1 + (shift - 1) u_j) (FlowMatchEulerDiscreteScheduler's
   static shift; FLUX-dev's dynamic shift with mu is the static shift exp(mu)). ``flow_shift`` 0 takes the
   teacher pipeline's: its scheduler config's static shift (SD3 3, FLUX-schnell 1, the gmm teacher 1), or
   FLUX-dev/lite's exp(mu) at the world's resolution (1024 px: 4096 tokens, 3.16); ``flow_shift`` > 0 sets it.
   Index j uniform in 1..N, t_{n+k} = t_j, t_n = t_{j-1} (t_0 = 0); x_t = (1 - t) x0 + t eps.
2. guidance as above; the teacher's ``predict_cfg`` turns w into a guidance-distilled FLUX's guidance input
   (convention "cond": w + 1) and runs true CFG otherwise (SD3, the gmm teacher).
3. the solver, flow's analogue of the DDIM step: one Euler step of the guided teacher velocity,
   x_s = x_t + (t_n - t_{n+k}) v^w (equal to (1 - t_n) x0^w + t_n eps^w: on the flow path DDIM is Euler).
4. f(x, t) = x0_student(x, t) for t > 0 and f(x, 0) = x: c_skip = 1[t = 0], c_out = 1[t > 0]. The velocity
   students (transformers: x0 = x_t - t v) meet f(x, 0) = x by their parameterization, so c_skip = 0, c_out = 1
   wherever they are evaluated; the indicator also imposes the boundary on x0-prediction students. It is the
   limit of LCM's scalings for a large time scaling, which on LCM's own grid they already are (c_skip(19) =
   7e-6), and it is what FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) samples with (x0 = x - t v,
   no c_skip), so an exported student samples as it trained. ``sigma_data`` / ``timestep_scaling`` are VP-only.
5. the same loss and target network.

The flow sampler: x0 = f(x, t) at each of ``student_timesteps`` (flow times in (0, 1], first 1.0, e.g. (1.0,) or
(1.0, 0.5)), re-noised to the next time t' with fresh noise, x = (1 - t') x0 + t' eps; the last x0 is the sample.
Guidance of a flow student: a student with ``time_cond_proj_dim`` (an MLP on the gmm teacher) takes w through
LCM's embedding as on VP; a transformer has no such input: a guidance-distilled FLUX student (FLUX-dev / -lite
copy or LoRA) takes w through its own guidance embedder, exactly as the teacher does (convention "cond": w + 1,
``student_guidance`` = the sampler's w in convention "cond", so FluxPipeline's guidance_scale = w + 1); any other
transformer (SD3, FLUX-schnell) needs ``guidance_embed = False`` (a fixed w distilled in, as LCM-LoRA).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.guidance import in_cond_convention
from jdistill.diffusion.samplers import student_plan
from jdistill.diffusion.schedules import FlowSchedule, VPSchedule, broadcast_to, shift_sigmas
from jdistill.methods.common import build_network, network_denoiser
from jdistill.methods.recipe import Pass, Recipe, Update
from jdistill.methods.rollout import renoising_sampler
from jdistill.methods.trajectory import consistency_scalings, huber_loss, skipping_grid, with_guidance
from jdistill.rng import streams

NETWORKS = ("student",)
TARGETS = ("ema", "online")
CONFIG_CHOICES = {"method.target_network": TARGETS}


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "lcm",
            "cfg_convention": "cond",  # y_c + w (y_c - y_u), as LCM's scripts
            "guidance_range": (5.0, 15.0),  # w ~ U[w_min, w_max]; LCM-LoRA: a fixed w (both equal)
            # the student takes w (needs networks.student.model.time_cond_proj_dim, or on a flow teacher a
            # guidance-distilled FLUX student, which takes it through its own guidance embedder)
            "guidance_embed": True,
            "num_ddim_timesteps": 50,  # the skipping-step grid's size (flow teachers: N points in (0, 1])
            "flow_shift": 0.0,  # flow teachers: the grid's shift; 0: the teacher schedule's
            "huber_c": 1e-3,
            "sigma_data": 0.5,  # VP only (LCM's boundary scalings)
            "timestep_scaling": 10.0,  # VP only
            "target_network": "ema",  # the target network: the student's EMA ("ema"), or sg(student) ("online")
            # the sampler's steps in schedule units: VP e.g. (999, 499) for two; flow (1.0,) or (1.0, 0.5)
            "student_timesteps": (999.0,),
            "sample_guidance": 7.5,  # w of the sampler (convention "cond")
        }
    )


# ------------------------------------------------------------------------------------------------ flow pieces


def flow_grid(num_points: int, shift: float = 1.0) -> np.ndarray:
    """The flow skipping grid with its start: (0, t_1, ..., t_N), t_j = shift_sigmas(j / N, shift) (float64;
    t_N = 1). Training pairs are (t_{j-1}, t_j)."""
    if int(num_points) != num_points or num_points < 1:
        raise ValueError(f"method.num_ddim_timesteps must be a positive integer, got {num_points}")
    if not shift > 0:
        raise ValueError(f"the flow grid's shift must be > 0, got {shift}")
    return shift_sigmas(np.arange(num_points + 1, dtype=np.float64) / num_points, shift)


def flow_solver_step(x_t: jax.Array, velocity: jax.Array, t: jax.Array, s: jax.Array) -> jax.Array:
    """One Euler step of the flow ODE dx/dt = v from t to s (per-sample times): x_s = x_t + (s - t) v."""
    return x_t.astype(jnp.float32) + broadcast_to(s - t, x_t) * velocity.astype(jnp.float32)


def flow_consistency(x_t: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
    """The flow consistency function from the student's x0: f = x0 for t > 0 and f = x_t at t = 0."""
    return jnp.where(broadcast_to(t == 0, x_t), x_t.astype(jnp.float32), x0.astype(jnp.float32))


def check_flow_timesteps(timesteps) -> tuple[float, ...]:
    """The flow sampler's times, each in (0, 1] (``student_plan`` checks that they decrease); a clear error for
    VP-unit timesteps."""
    times = tuple(float(t) for t in timesteps)
    if not times or not all(0.0 < t <= 1.0 for t in times):
        hint = " (VP timesteps like 999 are 1000x flow time)" if any(t > 1.0 for t in times) else ""
        raise ValueError(
            f"method.student_timesteps={times}: on a flow teacher (t in [0, 1], x_t = (1 - t) x0 + t eps) the "
            f"sampler's times are flow times in (0, 1]{hint}, e.g. (1.0,) for one step or (1.0, 0.5) for two"
        )
    return times


# ------------------------------------------------------------------------------------------------ recipe


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    m = config.method
    schedule = world.teacher.schedule
    flow = isinstance(schedule, FlowSchedule)
    if not flow and not isinstance(schedule, VPSchedule):
        raise ValueError(
            "lcm distils teachers on a VP (DDPM) or rectified-flow schedule; this teacher's is a "
            f"{type(schedule).__name__}"
        )
    if m.target_network not in TARGETS:
        raise ValueError(f"method.target_network: unknown {m.target_network!r}; choose one of {TARGETS}")
    net_cfg = config.networks.student
    if m.target_network == "ema" and not net_cfg.ema_decay > 0:
        raise ValueError("method.target_network='ema' needs networks.student.ema_decay > 0 (LCM: 0.95)")
    if flow:
        check_flow_timesteps(m.student_timesteps)
        if m.flow_shift < 0:
            raise ValueError(
                f"method.flow_shift={m.flow_shift}: the grid's shift must be > 0 (0: the schedule's)"
            )
    guidance_dim = net_cfg.model.get("time_cond_proj_dim", 0) if m.guidance_embed else 0
    if m.guidance_embed and not guidance_dim and not flow:
        raise ValueError(
            "method.guidance_embed needs a student with a guidance input: set "
            "networks.student.model.time_cond_proj_dim (LCM: 256), or guidance_embed=False (LCM-LoRA)"
        )
    if flow and guidance_dim and net_cfg.model.arch == "teacher" and "teacher" in world.nets:
        raise ValueError(
            f"networks.student.model.time_cond_proj_dim={guidance_dim}: LCM's guidance embedding is a UNet "
            "input, and this flow teacher's transformer has none; set it to 0 (a guidance-distilled FLUX student "
            "takes w through its own guidance embedder) or method.guidance_embed=False (a fixed w, as LCM-LoRA)"
        )
    w_min, w_max = m.guidance_range
    teacher = world.teacher
    network = build_network("student", net_cfg, world, config.num_steps)
    student = network_denoiser(network, net_cfg, schedule)
    # A guidance-distilled FLUX student takes w where the teacher does: its guidance embedder.
    embedded = bool(
        flow and m.guidance_embed and not guidance_dim and getattr(student, "embedded_guidance", 0)
    )
    if m.guidance_embed and not (guidance_dim or embedded):
        raise ValueError(
            "method.guidance_embed needs a student with a guidance input: on a flow teacher a guidance-distilled "
            "FLUX student (guidance_embeds, e.g. a FLUX-dev copy or LoRA) or networks.student.model."
            "time_cond_proj_dim on a non-transformer student; this student has neither (SD3 and FLUX-schnell "
            "transformers have no guidance input): set method.guidance_embed=False (a fixed w, as LCM-LoRA)"
        )

    def student_inputs(cond, w):
        return with_guidance(
            cond, w, embedded=embedded, convention=m.cfg_convention, guidance_dim=guidance_dim
        )

    if flow:
        # The teacher pipeline's shift: FLUX-dev's dynamic one at the world's resolution is the static exp(mu).
        teacher_shift = math.exp(schedule.mu) if schedule.mu is not None else float(schedule.shift)
        shift = float(m.flow_shift) if m.flow_shift else teacher_shift
        times = jnp.asarray(flow_grid(m.num_ddim_timesteps, shift), jnp.float32)

        def draw_times(key, n):
            j = jax.random.randint(key, (n,), 1, m.num_ddim_timesteps + 1)
            return times[j], times[j - 1]

        def solver(guided, x_t, t, s):
            return flow_solver_step(x_t, guided.velocity, t, s)

        def boundary(x_t, x0, t):
            return flow_consistency(x_t, x0, t)

    else:
        grid = skipping_grid(schedule.num_train_timesteps, m.num_ddim_timesteps)
        skip = schedule.num_train_timesteps // m.num_ddim_timesteps

        def draw_times(key, n):
            t = grid[jax.random.randint(key, (n,), 0, m.num_ddim_timesteps)]
            return t, jnp.maximum(t - skip, 0)

        def solver(guided, x_t, t, s):
            alpha_s, sigma_s = schedule.alpha_sigma(s)
            return broadcast_to(alpha_s, x_t) * guided.x0 + broadcast_to(sigma_s, x_t) * guided.eps

        def boundary(x_t, x0, t):
            c_skip, c_out = consistency_scalings(t, m.sigma_data, m.timestep_scaling)
            return broadcast_to(c_skip, x_t) * x_t.astype(jnp.float32) + broadcast_to(c_out, x0) * x0

    def consistency(params, x_t, t, cond):
        """f(x_t, t) = c_skip x_t + c_out x0_student(x_t, t)."""
        return boundary(x_t, student.predict(params, x_t, t, cond).x0, t)

    def target_params(params):
        if m.target_network == "ema":
            return network.net_params({**params, "student": params["student_ema"]})
        return jax.lax.stop_gradient(network.net_params(params))

    def loss(params, batch, key, carry):
        k = streams(key, "index", "noise", "guidance")
        x0, cond = batch["x0"], batch["cond"]
        n = x0.shape[0]
        t, s = draw_times(k["index"], n)
        eps = jax.random.normal(k["noise"], x0.shape, jnp.float32)
        x_t = schedule.add_noise(x0.astype(jnp.float32), eps, t)
        w = jax.random.uniform(k["guidance"], (n,), jnp.float32, w_min, w_max)
        student_cond = student_inputs(cond, w)

        guided = predict_cfg(teacher, params["teacher"], x_t, t, cond, world.uncond, w, m.cfg_convention)
        x_s = jax.lax.stop_gradient(solver(guided, x_t, t, s))
        target = jax.lax.stop_gradient(consistency(target_params(params), x_s, s, student_cond))
        out = consistency(network.net_params(params), x_t, t, student_cond)
        value = huber_loss(out, target, m.huber_c)
        return value, ({"target_distance": jnp.mean(jnp.abs(out - target))}, carry)

    plan = student_plan(schedule, tuple(m.student_timesteps))

    def boundary_predict(p, x_t, t, cond):
        """The student's prediction with x0 replaced by f(x_t, t): what the sampler re-noises."""
        return student.predict(p, x_t, t, cond).replace(x0=consistency(p, x_t, t, cond))

    sample = renoising_sampler(
        boundary_predict,
        plan,
        schedule,
        world.sample_shape,
        network.net_params,
        student_cond=lambda c: student_inputs(c, m.sample_guidance),
    )

    if embedded:  # in convention "cond", as Recipe.student_guidance is (the input is its value + 1)
        student_guidance = in_cond_convention(m.sample_guidance, m.cfg_convention)
    else:
        student_guidance = float(m.sample_guidance) if guidance_dim else None
    # A guidance-distilled teacher runs one pass per guided prediction, any other the cond/uncond pair.
    teacher_passes = 1.0 if getattr(teacher, "embedded_guidance", False) else 2.0
    return Recipe(
        networks=(network,),
        # The teacher's guided prediction (w is drawn per sample: two passes unless the guidance is an input),
        # the target network (EMA or sg(student), the student's architecture) and the differentiated student.
        updates=(
            Update(
                "student",
                ("student",),
                loss,
                passes=(Pass("teacher", teacher_passes), Pass("student"), Pass("student", 1.0, "params")),
            ),
        ),
        sample=sample,
        data="data",
        student_timesteps=tuple(float(t) for t in m.student_timesteps),
        # Flow: no c_skip; the sampler takes the student's x0 as it is (FlowMatchEulerDiscreteScheduler).
        consistency_boundary=None if flow else (float(m.sigma_data), float(m.timestep_scaling)),
        student_guidance=student_guidance,
    )
