"""``meanflow``: average-velocity students distilled from a teacher's flow (MeanFlow).

Reference: Geng et al., MeanFlow (arXiv 2505.13447); the distillation recipe of T2I-Distill's
train_meanflow.py; methods.md section 5.

The student u(z, r, t) is the average velocity over [r, t] on the rectified-flow path z_t = (1 - t) x + t eps
(the teacher runs on it whatever its own path, through ``diffusion.reparameterize``); it takes t and the
second time t - r, both O(1) (not x1000). Per step, on real data x and conditions c (dropped to the
unconditional input with probability ``cond_dropout``):

1. (r, t): the sorted pair of two logit-normal(mean, std) draws, r = t for a fraction 1 - ratio_r_not_t;
2. v = the teacher's velocity with CFG w (convention "uncond"), optionally mixed with the student's own
   guidance as T2I-Distill does: v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | 0);
3. du/dt = JVP of the student (stop-gradient parameters) along (v~, 0, 1) in (z, r, t) (``tangent = "data"``:
   along the data velocity eps - x instead, T2I-Distill's choice for unguided samples);
4. target u_tgt = v~ - (t - r) du/dt; loss = sg(w) |u - sg(u_tgt)|^2, w = 1 / (|u - u_tgt|^2 + 1e-3)^p.

A UNet student (model arch "teacher", a copy of the teacher) keeps the teacher's parameterization and path and
is read on the flow path the way the teacher is (u = eps - x0 of its prediction at the SNR-matched timestep);
t - r enters as sinusoids of 1000 (t - r) (minus those of 0) through diffusers' ``time_cond_proj_dim``
projection, which starts at zero so that the student starts as the teacher's conditional velocity.

Samples: z_1 = eps, then z_r = z_t - (t - r) u(z_t, r, t) over ``student_timesteps`` (1 first) down to 0.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import ml_collections

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.guidance import concat_cond
from jdistill.diffusion.jvp import directional_derivative
from jdistill.diffusion.reparameterize import on_schedule
from jdistill.diffusion.schedules import FlowSchedule
from jdistill.methods.common import build_network, drop_conditions, network_denoiser
from jdistill.methods.recipe import Network, Pass, Recipe, Update, derivative_passes
from jdistill.methods.rollout import sampler_noise
from jdistill.methods.score_distillation import cfg_evaluations
from jdistill.methods.trajectory import adaptive_loss, meanflow_target, meanflow_times, with_student_inputs
from jdistill.rng import streams

NETWORKS = ("student",)
TANGENTS = ("teacher", "data")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "meanflow",
            "time_mean": -0.4,
            "time_std": 1.0,
            "ratio_r_not_t": 0.75,
            "cond_dropout": 0.1,
            "cfg_convention": "uncond",
            "guidance_scale": 1.0,  # the teacher's CFG w (a guidance-distilled teacher: 1)
            "guidance_mix": (1.0, 0.0),  # (omega, kappa); T2I-Distill: (1.0, 0.5)
            "tangent": "teacher",
            "jvp": "jvp",
            "jvp_step": 1e-3,
            "adaptive_power": 1.0,
            "adaptive_eps": 1e-3,
            "student_timesteps": (1.0,),  # e.g. (1.0, 0.5) for two steps
        }
    )


def start_as_teacher(network: Network) -> Network:
    """A UNet student copied from the teacher with its t - r projection (``time_embedding.cond_proj``) at zero:
    u(z, r, t) starts as the teacher's conditional velocity v(z, t) for every r (the projection still gets
    gradients, its input being nonzero for r < t)."""
    copy = network.initial_params

    def init(key, frozen):
        def zero(path, x):
            return jnp.zeros_like(x) if "cond_proj" in jax.tree_util.keystr(path) else x

        return jax.tree_util.tree_map_with_path(zero, copy(key, frozen))

    return dataclasses.replace(network, init=init)


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    m = config.method
    if m.tangent not in TANGENTS:
        raise ValueError(f"method.tangent: unknown {m.tangent!r}; choose one of {TANGENTS}")
    net_cfg = config.networks.student
    unet = net_cfg.model.get("arch") == "teacher"
    if not unet and not net_cfg.model.get("second_time"):
        raise ValueError("a MeanFlow student takes two times: set networks.student.model.second_time=True")
    delta_dim = net_cfg.model.get("time_cond_proj_dim", 0) if unet else 0
    if unet and not delta_dim:
        raise ValueError(
            "a MeanFlow UNet student takes t - r through its timestep condition: set "
            "networks.student.model.time_cond_proj_dim (e.g. 64)"
        )
    schedule = FlowSchedule()
    teacher = on_schedule(world.teacher, schedule)
    network = build_network("student", net_cfg, world, config.num_steps)
    if unet:
        # A copy of the teacher on its own path, read on the flow path as the teacher is: u = eps - x0.
        network = start_as_teacher(network)
        student = on_schedule(network_denoiser(network, net_cfg, world.teacher.schedule), schedule)
    omega, kappa = m.guidance_mix
    times = tuple(float(t) for t in m.student_timesteps)
    if not times or times[0] != 1.0 or any(b >= a for a, b in itertools.pairwise(times)):
        raise ValueError(f"method.student_timesteps must start at 1.0 and decrease, got {times}")

    def average_velocity(p, z, r, t, cond):
        """u(z, r, t | cond) in float32; times are flow times in [0, 1] (O(1) inputs)."""
        n = z.shape[0]
        r, t = (jnp.broadcast_to(jnp.asarray(a, jnp.float32), (n,)) for a in (r, t))
        inputs = with_student_inputs(cond, time_delta=t - r, delta_dim=delta_dim)
        if unet:
            return student.predict(p, z, t, inputs).velocity.astype(jnp.float32)
        out = network.net.apply(p, z, t, inputs)
        return out.astype(jnp.float32)

    def loss(params, batch, key, carry):
        k = streams(key, "time", "noise", "dropout")
        x = batch["x0"].astype(jnp.float32)
        n = x.shape[0]
        cond = drop_conditions(k["dropout"], batch["cond"], world.uncond, m.cond_dropout)
        r, t = meanflow_times(k["time"], n, m.time_mean, m.time_std, m.ratio_r_not_t)
        eps = jax.random.normal(k["noise"], x.shape, jnp.float32)
        z_t = schedule.add_noise(x, eps, t)
        v = predict_cfg(
            teacher, params["teacher"], z_t, t, cond, world.uncond, m.guidance_scale, m.cfg_convention
        ).velocity
        own = network.net_params(params)
        frozen = jax.lax.stop_gradient(own)
        if (omega, kappa) != (1.0, 0.0):
            # v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | 0): one batched pass
            both = average_velocity(
                frozen,
                jnp.concatenate([z_t, z_t]),
                jnp.concatenate([t, t]),
                jnp.concatenate([t, t]),
                concat_cond(cond, world.uncond),
            )
            u_cond, u_uncond = jnp.split(both, 2)
            v = omega * v + kappa * u_cond + (1.0 - omega - kappa) * u_uncond
        v = jax.lax.stop_gradient(v)
        tangent_z = v if m.tangent == "teacher" else eps - x
        _, du_dt = directional_derivative(
            lambda z, r_, t_: average_velocity(frozen, z, r_, t_, cond),
            (z_t, r, t),
            (tangent_z, jnp.zeros_like(r), jnp.ones_like(t)),
            method=m.jvp,
            step=m.jvp_step,
        )
        target = jax.lax.stop_gradient(meanflow_target(v, du_dt, t, r))
        u = average_velocity(own, z_t, r, t, cond)
        value = adaptive_loss(u, target, m.adaptive_power, m.adaptive_eps)
        metrics = {"mse": jnp.mean((u - target) ** 2)}
        return value, (metrics, carry)

    ends = (*times[1:], 0.0)
    # The teacher (guided or not), the student's own conditional and unconditional velocities when mixed in,
    # the JVP of sg(student), and the differentiated student.
    mixed = (Pass("student", 2.0),) if (omega, kappa) != (1.0, 0.0) else ()
    passes = (
        Pass("teacher", float(cfg_evaluations(m.guidance_scale, m.cfg_convention))),
        *mixed,
        *derivative_passes("student", m.jvp, primal_used=False),
        Pass("student", 1.0, "params"),
    )

    def sample(params, cond, key):
        n = jax.tree.leaves(cond)[0].shape[0]
        z, _ = sampler_noise(key, schedule, (n, *world.sample_shape))  # deterministic after the noise
        p = network.net_params(params)
        for t, r in zip(times, ends, strict=True):
            z = z - (t - r) * average_velocity(p, z, r, t, cond)
        return z

    return Recipe(
        networks=(network,),
        updates=(Update("student", ("student",), loss, passes=passes),),
        sample=sample,
        data="data",
        student_timesteps=times,
        no_diffusers_export="an average-velocity student (two time inputs, z_r = z_t - (t - r) u) has no "
        "diffusers pipeline: no diffusers scheduler takes the UNet's t - r input or its flow-path update; use "
        "--mode sample, or the flat export of a gmm run",
    )
