"""``meanflow``: average-velocity students distilled from a teacher's flow (MeanFlow).

Reference: Geng et al., MeanFlow (arXiv 2505.13447); the distillation recipe of T2I-Distill's
train_meanflow.py; docs/trajectory.md, MeanFlow.

The student u(z, r, t) is the average velocity over [r, t] on the rectified-flow path z_t = (1 - t) x + t eps
(the teacher runs on it whatever its own path, through ``diffusion.reparameterize``); it takes t and the
second time t - r, both O(1) (not x1000). Per step, on real data x and conditions c (dropped to the
unconditional input with probability ``cond_dropout``):

1. (r, t): the sorted pair of two logit-normal(mean, std) draws, r = t for a fraction 1 - ratio_r_not_t;
2. v = the teacher's velocity with CFG w (convention "uncond"; w per sample from ``guidance_choices`` when set,
   T2I-Distill's {4, 4.5, 5}, given to a guidance-distilled FLUX student's embedding too), optionally mixed
   with the student's own guidance as T2I-Distill does on the conditioned samples with t in ``mix_window``:
   v~ = omega v + kappa u(z, r', t | c) + (1 - omega - kappa) u(z, r', t | 0), r' = t (``mix_delta`` "zero",
   the paper's) or r ("interval", train_meanflow.py's);
3. du/dt = JVP of the student (stop-gradient parameters) along (v~, 0, 1) in (z, r, t) (``tangent = "data"``:
   along the data velocity eps - x instead for the unmixed samples, T2I-Distill's choice);
4. target u_tgt = v~ - (t - r) du/dt; loss = sg(w) |u - sg(u_tgt)|^2, w = 1 / (|u - u_tgt|^2 + 1e-3)^p.

A UNet student (model arch "teacher", a copy of the teacher) keeps the teacher's parameterization and path and
is read on the flow path the way the teacher is (u = eps - x0 of its prediction at the SNR-matched timestep);
t - r enters as sinusoids of 1000 (t - r) (minus those of 0) through diffusers' ``time_cond_proj_dim``
projection, which starts at zero so that the student starts as the teacher's conditional velocity.

A FLUX or SD3 transformer student (model arch "teacher" on a flow teacher, ``teacher.kind = "flow"``) is the
teacher's transformer with jdistill's ``timestep_delta_embeds``: t - r is embedded like the timestep (the
model's own sinusoids and time scale, FLUX 1000 (t - r), SD3 1000 (t - r) as its ``timesteps``) by a second
MLP, ``time_text_embed.timestep_delta_embedder``, added to the conditioning embedding. Copied from the teacher,
that MLP's first linear is the teacher's ``timestep_embedder.linear_1`` and its last linear starts at zero, so
the student starts exactly as the teacher's velocity (``model.timestep_delta_init`` "zero"), or the whole MLP is
a copy of ``timestep_embedder`` ("copy", T2I-Distill's). ``model.timestep_scale`` (FLUX): the factor t, t - r and
the guidance are embedded with (T2I-Distill: 1, diffusers: 1000). It predicts u directly (the transformer's output is a
velocity on the flow path); a guidance-distilled FLUX student (FLUX-dev, -lite) takes the guidance input the
teacher gets for ``guidance_scale`` (as lcm's does), so that at r = t it starts as the guided teacher. Set
``networks.student.model.timestep_delta_embeds=True`` and ``networks.student.model.time_cond_proj_dim=0``.

Samples: z_1 = eps, then z_r = z_t - (t - r) u(z_t, r, t) over ``student_timesteps`` (1 first, through
``student_shift``) down to 0. Export (FLUX / SD3 students): equal steps at diffusers' time scale fold the fixed
t - r embedding into a bias (the plain transformer class); other FLUX students keep the embedder, written as
``convert/meanflow_flux.py``'s diffusers class.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdistill.diffusion.denoiser import predict_cfg, with_guidance_input
from jdistill.diffusion.guidance import concat_cond, in_cond_convention
from jdistill.diffusion.jvp import JVP_METHODS, directional_derivative
from jdistill.diffusion.reparameterize import on_schedule
from jdistill.diffusion.schedules import FlowSchedule, broadcast_to
from jdistill.diffusion.transformer_denoiser import FlowTransformerDenoiser, transformer_family
from jdistill.methods.common import (
    TIME_SCALE_OPTION,
    build_network,
    drop_conditions,
    network_denoiser,
    student_time_scale,
    teacher_copy,
    with_transformer_options,
)
from jdistill.methods.recipe import Network, Pass, Recipe, Update, derivative_passes
from jdistill.methods.rollout import sampler_start
from jdistill.methods.score_distillation import cfg_evaluations
from jdistill.methods.trajectory import adaptive_loss, meanflow_target, meanflow_times, with_student_inputs
from jdistill.models.net import Net
from jdistill.rng import streams

NETWORKS = ("student",)
TANGENTS = ("teacher", "data")
CONFIG_CHOICES = {"method.jvp": JVP_METHODS, "method.tangent": TANGENTS}
DELTA_OPTION = "timestep_delta_embeds"  # FluxConfig / SD3Config field and networks.student.model key
DELTA_EMBEDDER = "timestep_delta_embedder"  # its module under time_text_embed
MIX_DELTAS = ("zero", "interval")
DELTA_INITS = ("zero", "copy")


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
            # The times through s -> k s / (1 + (k - 1) s); 1: as given, 0: the teacher pipeline's shift
            "student_shift": 1.0,
            # w per sample from these for the teacher's CFG and a FLUX student's guidance input (T2I-Distill:
            # 4, 4.5, 5); empty: guidance_scale
            "guidance_choices": (),
            "sample_guidance": 0.0,  # the FLUX student's guidance input when sampling; 0: guidance_scale
            # The student's own velocities in the guidance mix at t - r = 0 ("zero", the paper's u(z, t, t))
            # or at the sample's r ("interval", T2I-Distill's train_meanflow.py passes timestep2 = t - r)
            "mix_delta": "zero",
            "mix_window": (0.0, 1.0),  # the mix applies to conditioned samples with t in here (cfg_min/max_t)
        }
    )


def _starts_at_zero(path) -> bool:
    """The last layer of the student's t - r input: a UNet's ``time_embedding.cond_proj``, a transformer's
    ``time_text_embed.timestep_delta_embedder.linear_2`` (kernel and bias)."""
    names = tuple(str(getattr(k, "key", k)) for k in path)
    return "cond_proj" in names or any(
        a == DELTA_EMBEDDER and b == "linear_2" for a, b in itertools.pairwise(names)
    )


def start_as_teacher(network: Network) -> Network:
    """A student copied from the teacher with the last layer of its t - r input at zero (a UNet's projection
    ``time_embedding.cond_proj``, a transformer's ``time_text_embed.timestep_delta_embedder.linear_2``):
    u(z, r, t) starts as the teacher's conditional velocity v(z, t) for every r (that layer still gets
    gradients, its input being nonzero)."""
    copy = network.initial_params

    def init(key, frozen):
        def zero(path, x):
            return jnp.zeros_like(x) if _starts_at_zero(path) else x

        return jax.tree_util.tree_map_with_path(zero, copy(key, frozen))

    return dataclasses.replace(network, init=init)


def copy_with_delta_embedder(network: Network, whole: bool = False) -> Network:
    """Init from the teacher for a transformer student: the teacher's parameters (float32 master copies), and
    the t - r embedder from the teacher's ``timestep_embedder``: both linears (``whole``: T2I-Distill's
    train_meanflow.py loads the time embedder's state dict into the second one), or the first only, the last
    at zero (set again by ``start_as_teacher``), so that the student starts as the teacher's velocity."""
    abstract = network.net.abstract

    def init(key, frozen):
        embed = dict(abstract["time_text_embed"])
        delta = embed.pop(DELTA_EMBEDDER)
        params = teacher_copy(key, frozen["teacher"], {**abstract, "time_text_embed": embed})
        source = params["time_text_embed"]["timestep_embedder"]
        new = {
            "linear_1": jax.tree.map(lambda a: jnp.array(a, copy=True), source["linear_1"]),
            "linear_2": jax.tree.map(lambda a: jnp.array(a, copy=True), source["linear_2"])
            if whole
            else jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), delta["linear_2"]),
        }
        return {**params, "time_text_embed": {**params["time_text_embed"], DELTA_EMBEDDER: new}}

    return dataclasses.replace(network, init=init)


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    m = config.method
    if m.tangent not in TANGENTS:
        raise ValueError(f"method.tangent: unknown {m.tangent!r}; choose one of {TANGENTS}")
    net_cfg = config.networks.student
    copy = net_cfg.model.get("arch") == "teacher"
    family = transformer_family(world.nets.get("teacher")) if copy else None
    unet = copy and family is None
    if not copy and not net_cfg.model.get("second_time"):
        raise ValueError("a MeanFlow student takes two times: set networks.student.model.second_time=True")
    if family is not None:
        _check_transformer_student(net_cfg, family)
    elif net_cfg.model.get(DELTA_OPTION):
        raise ValueError(
            f"networks.student.model.{DELTA_OPTION} is for FLUX / SD3 transformer students (a flow teacher); "
            "a UNet student takes t - r through networks.student.model.time_cond_proj_dim"
        )
    delta_dim = net_cfg.model.get("time_cond_proj_dim", 0) if unet else 0
    if unet and not delta_dim:
        raise ValueError(
            "a MeanFlow UNet student takes t - r through its timestep condition: set "
            "networks.student.model.time_cond_proj_dim (e.g. 64)"
        )
    schedule = FlowSchedule()
    teacher = on_schedule(world.teacher, schedule)
    if family is not None:
        delta_init = net_cfg.model.get("timestep_delta_init", "zero")
        if delta_init not in DELTA_INITS:
            raise ValueError(
                f"networks.student.model.timestep_delta_init: unknown {delta_init!r}; choose one of {DELTA_INITS}"
            )
        options = {DELTA_OPTION: True, **student_time_scale(net_cfg.model, family)}
        network = build_network(
            "student", net_cfg, with_transformer_options(world, **options), config.num_steps
        )
        if network.init is not None:  # from the teacher (model.init "teacher")
            network = copy_with_delta_embedder(network, whole=delta_init == "copy")
        if delta_init == "zero":
            network = start_as_teacher(network)
        # Its flow denoiser only to tell a guidance-distilled FLUX; the call adds t - r.
        flow = FlowTransformerDenoiser(network.net, schedule, family)
    else:
        network = build_network("student", net_cfg, world, config.num_steps)
    if unet:
        # A copy of the teacher on its own path, read on the flow path as the teacher is: u = eps - x0.
        network = start_as_teacher(network)
        student = on_schedule(network_denoiser(network, net_cfg, world.teacher.schedule), schedule)
    omega, kappa = m.guidance_mix
    mixing = (omega, kappa) != (1.0, 0.0)
    if m.mix_delta not in MIX_DELTAS:
        raise ValueError(f"method.mix_delta: unknown {m.mix_delta!r}; choose one of {MIX_DELTAS}")
    lo, hi = (float(a) for a in m.mix_window)
    times = student_times(m, world.teacher.schedule)
    choices = tuple(float(w) for w in m.guidance_choices)
    sample_w = float(m.sample_guidance) or float(m.guidance_scale)

    def average_velocity(p, z, r, t, cond, w):
        """u(z, r, t | cond) in float32; times are flow times in [0, 1] (O(1) inputs); ``w`` the guidance
        input of a guidance-distilled FLUX student (per sample or one)."""
        n = z.shape[0]
        r, t = (jnp.broadcast_to(jnp.asarray(a, jnp.float32), (n,)) for a in (r, t))
        inputs = with_student_inputs(cond, time_delta=t - r, delta_dim=delta_dim)
        if unet:
            return student.predict(p, z, t, inputs).velocity.astype(jnp.float32)
        if family is not None:
            return transformer_velocity(p, z, r, t, cond, w)
        out = network.net.apply(p, z, t, inputs)
        return out.astype(jnp.float32)

    def transformer_velocity(p, z, r, t, cond, w):
        """The transformer's output (a velocity: u) with its time convention: FLUX takes flow times and
        scales them itself, SD3 takes 1000 t and 1000 (t - r); a guidance-distilled FLUX takes the teacher's
        guidance input for CFG ``w``."""
        if flow.embedded_guidance:
            cond = with_guidance_input(cond, w, m.cfg_convention, z.shape[0])
        if family == "flux":
            out = network.net.apply(p, z, t, cond, timestep_delta=t - r, method="on_latents")
        else:
            delta = schedule.model_time(t) - schedule.model_time(r)
            out = network.net.apply(p, z, schedule.model_time(t), cond, timestep_delta=delta)
        return out.astype(jnp.float32)

    def loss(params, batch, key, carry):
        k = streams(key, "time", "noise", "dropout", "guidance")
        x = batch["x0"].astype(jnp.float32)
        n = x.shape[0]
        dropped = jax.random.bernoulli(k["dropout"], m.cond_dropout, (n,)) if m.cond_dropout > 0 else None
        cond = drop_conditions(k["dropout"], batch["cond"], world.uncond, m.cond_dropout)  # the same draws
        r, t = meanflow_times(k["time"], n, m.time_mean, m.time_std, m.ratio_r_not_t)
        eps = jax.random.normal(k["noise"], x.shape, jnp.float32)
        z_t = schedule.add_noise(x, eps, t)
        w = m.guidance_scale
        if choices:  # T2I-Distill: w per sample, for the teacher and the student's guidance input
            w = jnp.asarray(choices, jnp.float32)[jax.random.randint(k["guidance"], (n,), 0, len(choices))]
        v = predict_cfg(teacher, params["teacher"], z_t, t, cond, world.uncond, w, m.cfg_convention).velocity
        own = network.net_params(params)
        frozen = jax.lax.stop_gradient(own)
        tangent_z = v if m.tangent == "teacher" else eps - x
        if mixing:
            # v~ = omega v + kappa u(z, r', t | c) + (1 - omega - kappa) u(z, r', t | 0), one batched pass, on
            # the conditioned samples with t in mix_window (train_meanflow.py's cfg samples); r' = t (the
            # paper's instantaneous velocity) or r (mix_delta "interval": the script's timestep2 = t - r).
            r_mix = t if m.mix_delta == "zero" else r
            w_pair = jnp.concatenate([jnp.broadcast_to(jnp.asarray(w, jnp.float32), (n,))] * 2)
            both = average_velocity(
                frozen,
                jnp.concatenate([z_t, z_t]),
                jnp.concatenate([r_mix, r_mix]),
                jnp.concatenate([t, t]),
                concat_cond(cond, world.uncond),
                w_pair,
            )
            u_cond, u_uncond = jnp.split(both, 2)
            mixed = omega * v + kappa * u_cond + (1.0 - omega - kappa) * u_uncond
            guided = (t >= lo) & (t <= hi)
            if dropped is not None:
                guided = guided & ~dropped
            guided = broadcast_to(guided, v)
            v = jnp.where(guided, mixed, v)
            tangent_z = jnp.where(guided, mixed, tangent_z)  # the guided samples' tangent is v~ either way
        v, tangent_z = jax.lax.stop_gradient(v), jax.lax.stop_gradient(tangent_z)
        _, du_dt = directional_derivative(
            lambda z, r_, t_: average_velocity(frozen, z, r_, t_, cond, w),
            (z_t, r, t),
            (tangent_z, jnp.zeros_like(r), jnp.ones_like(t)),
            method=m.jvp,
            step=m.jvp_step,
        )
        target = jax.lax.stop_gradient(meanflow_target(v, du_dt, t, r))
        u = average_velocity(own, z_t, r, t, cond, w)
        value = adaptive_loss(u, target, m.adaptive_power, m.adaptive_eps)
        metrics = {"mse": jnp.mean((u - target) ** 2)}
        return value, (metrics, carry)

    ends = (*times[1:], 0.0)
    # The teacher (guided or not), the student's own conditional and unconditional velocities when mixed in,
    # the JVP of sg(student), and the differentiated student.
    passes = (
        Pass("teacher", float(cfg_evaluations(m.guidance_scale, m.cfg_convention, teacher))),
        *((Pass("student", 2.0),) if mixing else ()),
        *derivative_passes("student", m.jvp, primal_used=False),
        Pass("student", 1.0, "params"),
    )

    def sample(params, cond, key):
        # Deterministic after the initial noise: the re-noising key goes unused.
        start = sampler_start(key, schedule, world.sample_shape, cond, network.net_params(params))
        z = start.noise
        for t, r in zip(times, ends, strict=True):
            z = z - (t - r) * average_velocity(start.params, z, r, t, start.cond, sample_w)
        return z

    return Recipe(
        networks=(network,),
        updates=(Update("student", ("student",), loss, passes=passes),),
        sample=sample,
        data="data",
        student_timesteps=times,
        **_export(network, family, flow if family is not None else None, times, schedule, sample_w, m),
    )


def student_times(m: ml_collections.ConfigDict, teacher_schedule) -> tuple[float, ...]:
    """``method.student_timesteps`` (1 first, decreasing) through the shift s -> k s / (1 + (k - 1) s) with k =
    ``method.student_shift`` (1: as given; 0: the teacher pipeline's own, FLUX's exp(mu) at the world's
    resolution, as T2I-Distill's MeanFlow pipeline places its steps)."""
    times = tuple(float(t) for t in m.student_timesteps)
    if not times or times[0] != 1.0 or any(b >= a for a, b in itertools.pairwise(times)):
        raise ValueError(f"method.student_timesteps must start at 1.0 and decrease, got {times}")
    k = float(m.student_shift)
    if k == 1.0:
        return times
    if k < 0:
        raise ValueError(f"method.student_shift={k} must be > 0 (0: the teacher pipeline's shift)")
    if k == 0:
        mu = getattr(teacher_schedule, "mu", None)
        k = math.exp(mu) if mu is not None else float(getattr(teacher_schedule, "shift", 1.0))
    return tuple(float(np.float32(k * t / (1.0 + (k - 1.0) * t))) for t in times)


def _export(network, family, flow, times, schedule, sample_w: float, m) -> dict:
    """The Recipe fields that say how the student exports: a FLUX student with its t - r embedder (a custom
    transformer class, any steps and time scale), or with equal steps and diffusers' time scale its fixed t - r
    embedding folded into a bias (the plain class; SD3 too); others do not export."""
    ends = (*times[1:], 0.0)
    steps = {round(t - r, 6) for t, r in zip(times, ends, strict=True)}
    if family is None:
        return {
            "no_diffusers_export": "an average-velocity student (two time inputs, z_r = z_t - (t - r) u) has no "
            "diffusers pipeline: no diffusers scheduler takes the UNet's t - r input or its flow-path update; "
            "use --mode sample, or the flat export of a gmm run"
        }
    guided = flow.embedded_guidance
    common = {
        "no_diffusers_export": "",
        "flow_update": "euler",
        # The guidance input the sampler gives a guidance-distilled FLUX student, as w in convention "cond".
        "student_guidance": in_cond_convention(sample_w, m.cfg_convention) if guided else None,
    }
    own_scale = getattr(network.net.config, TIME_SCALE_OPTION, 1000.0) != 1000.0
    if family == "flux" and (len(steps) > 1 or own_scale):
        return common  # export_params None: written with its t - r embedder (convert/meanflow_flux.py)
    if len(steps) > 1:
        return {
            "no_diffusers_export": f"the student's steps t - r {sorted(steps)} differ, so its t - r input "
            "cannot be folded into an SD3 transformer for a diffusers pipeline; equal steps (e.g. "
            "student_timesteps (1.0, 0.75, 0.5, 0.25)) export, others sample with --mode sample"
        }
    (delta,) = steps
    model_delta = delta if family == "flux" else float(schedule.model_time(delta))
    return {**common, "export_params": lambda p: fold_delta_embedding(network.net, p, model_delta)}


def _check_transformer_student(net_cfg: ml_collections.ConfigDict, family: str) -> None:
    name = {"flux": "FLUX", "sd3": "SD3"}[family]
    model = net_cfg.model
    if not model.get(DELTA_OPTION):
        raise ValueError(
            f"a MeanFlow {name} transformer student takes t - r through a second timestep embedding: set "
            f"networks.student.model.{DELTA_OPTION}=True"
        )
    if model.get("time_cond_proj_dim", 0):
        raise ValueError(
            f"networks.student.model.time_cond_proj_dim={model.time_cond_proj_dim} is the UNet's t - r input; "
            f"a {name} transformer student takes t - r through networks.student.model.{DELTA_OPTION}: set "
            "networks.student.model.time_cond_proj_dim=0"
        )
    if net_cfg.get("lora") is not None and net_cfg.lora.rank:
        raise ValueError(
            f"a LoRA on the {name} teacher has no t - r input: MeanFlow trains a full copy with "
            f"networks.student.model.{DELTA_OPTION}=True (networks.student.lora.rank=0)"
        )


def fold_delta_embedding(net: Net, params: dict, delta: float) -> dict:
    """A transformer student's parameters for its steps of one fixed t - r: the t - r embedding (a constant
    then) added to the conditioning embedding's last bias, and the embedder removed, so that the teacher's own
    architecture (diffusers' class, no second time input) computes the same. ``delta`` in the model's units."""
    extra = np.asarray(net.apply(params, jnp.float32(delta), method="delta_embedding"), np.float64)[0]
    embed = dict(params["time_text_embed"])
    embed.pop(DELTA_EMBEDDER)
    text = embed["text_embedder"]
    last = dict(text["linear_2"])
    last["bias"] = (np.asarray(last["bias"], np.float64) + extra).astype(np.asarray(last["bias"]).dtype)
    embed["text_embedder"] = {**text, "linear_2": last}
    return {**params, "time_text_embed": embed}
