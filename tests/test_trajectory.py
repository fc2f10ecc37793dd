"""Trajectory distillation pieces (LCM, sCM, MeanFlow) against independent references: closed forms, central
differences, and the losses recomputed by hand with their stop-gradients made explicit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load
from test_unet import VARIANTS

from jdistill.diffusion.denoiser import NetworkDenoiser, predict_cfg
from jdistill.diffusion.jvp import directional_derivative
from jdistill.diffusion.reparameterize import MatchedDenoiser, on_schedule, trigflow_output
from jdistill.diffusion.schedules import FlowSchedule, TrigFlowSchedule, VPSchedule
from jdistill.methods import Carry, build_recipe
from jdistill.methods.trajectory import (
    consistency_scalings,
    meanflow_times,
    skipping_grid,
    time_delta_embedding,
    trigflow_times,
    with_student_inputs,
)
from jdistill.models.embeddings import guidance_embedding
from jdistill.models.mlp import TimeMLP
from jdistill.models.net import Net
from jdistill.models.unet import UNetConfig, unet_net
from jdistill.rng import streams
from jdistill.teachers import build_world
from jdistill.teachers.gmm import GaussianMixture, GMMTeacher

VP = VPSchedule.from_betas()
TRIG = TrigFlowSchedule(sigma_data=0.5)


def central_difference(f, primals, tangents, h):
    plus = f(*[p + h * v for p, v in zip(primals, tangents, strict=True)])
    minus = f(*[p - h * v for p, v in zip(primals, tangents, strict=True)])
    return (plus - minus) / (2 * h)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


# ------------------------------------------------------------------------------------------------ wrapper


@pytest.mark.parametrize("base_schedule", [FlowSchedule(), VP], ids=["flow", "vp"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_teacher_on_another_path_keeps_its_x0_exactly(base_schedule, scale):
    """The analytic teacher on flow / VP, moved onto TrigFlow, equals the analytic teacher of the same data
    (times ``scale``) built on TrigFlow directly."""
    mixture = GaussianMixture()
    scaled = GaussianMixture(radius=mixture.radius * scale, std=mixture.std * scale)
    moved = MatchedDenoiser(GMMTeacher(mixture, base_schedule), TRIG, data_scale=scale)
    direct = GMMTeacher(scaled, TRIG)
    rng = np.random.default_rng(0)
    # VP's path only covers sigma / alpha in [0.029, 14.6] (t = 0 and 999): 0.058 < tan t < 29 there
    t = jnp.asarray(
        rng.uniform(0.1, 1.45, 64) if base_schedule is VP else rng.uniform(0.01, 1.56, 64), jnp.float32
    )
    x_t = jnp.asarray(rng.standard_normal((64, 2)) * 1.5, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, 64), jnp.int32)
    a, b = moved.predict({}, x_t, t, labels), direct.predict({}, x_t, t, labels)
    np.testing.assert_allclose(a.x0, b.x0, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(a.velocity, b.velocity, atol=2e-4, rtol=1e-4)


def test_flow_model_as_trigflow_matches_sana_sprint_closed_form():
    """A random velocity-prediction flow MLP under the wrapper (TrigFlow data = sigma_d x flow data) gives
    SANA-Sprint's F = [(1 - 2s) x^F + (1 - 2s + 2s^2) v] / N, s = sin t / (sin t + cos t),
    N = sqrt(s^2 + (1 - s)^2), x^F = (x_t / sigma_d) N, v = the flow model at (x^F, s)."""
    flow = FlowSchedule()
    net = Net("flow", lambda rngs: TimeMLP(2, 2, width=32, hidden=64, depth=2, rngs=rngs))
    params = net.init(jax.random.key(0))
    model = NetworkDenoiser(net, "velocity", flow)
    sd = TRIG.sigma_data
    wrapped = on_schedule(model, TRIG, data_scale=sd)
    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.uniform(0.05, 1.5, 16), jnp.float32)
    x_t = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, 16), jnp.int32)
    ours = trigflow_output(wrapped.predict(params, x_t, t, labels), sd)

    s = jnp.sin(t) / (jnp.sin(t) + jnp.cos(t))
    norm = jnp.sqrt(s**2 + (1 - s) ** 2)[:, None]
    x_f = x_t / sd * norm
    v = net.apply(params, x_f, flow.model_time(s), labels)
    expected = ((1 - 2 * s)[:, None] * x_f + (1 - 2 * s + 2 * s**2)[:, None] * v) / norm
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-4)


def test_time_for_ratio_inverts_each_path():
    ratios = jnp.asarray([0.05, 0.3, 1.0, 4.0, 12.0], jnp.float32)  # VP covers [0.029, 14.6]
    for schedule in (VP, FlowSchedule(), TRIG):
        t = schedule.time_for_ratio(ratios)
        alpha, sigma = schedule.alpha_sigma(t)
        np.testing.assert_allclose(sigma / alpha, ratios, rtol=2e-4)


# ------------------------------------------------------------------------------------------------ JVP


def mlp_trigflow_output():
    net = Net("s", lambda rngs: TimeMLP(2, 2, width=32, hidden=64, depth=2, fourier_features=2, rngs=rngs))
    params = net.init(jax.random.key(3))
    denoiser = NetworkDenoiser(net, "velocity", TRIG)
    labels = jnp.asarray([0, 1, 2, 1], jnp.int32)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
    return (lambda x, t: trigflow_output(denoiser.predict(params, x, t, labels), 0.5)), x, 1e-2


def unet_trigflow_output():
    """A tiny random eps UNet on SD's VP path, run as a TrigFlow model (sCM's student from a UNet teacher)."""
    kw = VARIANTS["lcm"]
    net = unet_net(UNetConfig.from_dict(kw))
    params = net.init(jax.random.key(4))
    rng = np.random.default_rng(5)
    cond = {
        "encoder_hidden_states": jnp.asarray(
            rng.standard_normal((2, 7, kw["cross_attention_dim"])), jnp.float32
        ),
        "timestep_cond": guidance_embedding(jnp.asarray([4.0, 5.0]), kw["time_cond_proj_dim"]),
    }
    denoiser = on_schedule(NetworkDenoiser(net, "eps", VP), TRIG)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 4)) * 0.5, jnp.float32)
    # SD's time embedding turns with VP time (x1000 of TrigFlow's): differences need a small step
    return (lambda x, t: trigflow_output(denoiser.predict(params, x, t, cond), 0.5)), x, 1e-4


@pytest.mark.parametrize("make", [mlp_trigflow_output, unet_trigflow_output], ids=["mlp", "tiny_unet"])
def test_jvp_along_x_and_t_matches_central_differences_under_jit(make):
    f, x, h = make()
    n = x.shape[0]
    t = jnp.linspace(0.3, 1.2, n)
    v = jnp.asarray(np.random.default_rng(6).standard_normal(x.shape), jnp.float32)
    dt = jnp.full((n,), 0.7, jnp.float32)

    @jax.jit
    def both(x, t, v, dt):
        jvp = directional_derivative(f, (x, t), (v, dt), method="jvp")
        fd = directional_derivative(f, (x, t), (v, dt), method="finite_difference", step=h)
        return jvp, fd

    (out, tangent), (out_fd, tangent_fd) = both(x, t, v, dt)
    reference = central_difference(f, (x, t), (v, dt), h)
    assert tangent.dtype == jnp.float32
    assert rel_err(tangent, reference) < 1e-2
    assert rel_err(tangent_fd, reference) < 1e-3  # the fallback is that central difference (jit rounding)
    # The same function's value from two programs (the JVP's primal and the plain forward): equal up to the
    # rounding of how XLA fuses each (4e-6 on the tiny UNet without LLVM's optimisations).
    np.testing.assert_allclose(out, out_fd, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(tangent).max()) > 1e-2  # a real direction, not a vanishing one


def unet_meanflow_velocity():
    """A tiny random eps UNet on SD's VP path read on the flow path as MeanFlow's u(z, r, t): t - r enters
    through its timestep condition (``with_student_inputs(..., delta_dim)``)."""
    kw = VARIANTS["lcm"]
    net = unet_net(UNetConfig.from_dict(kw))
    params = net.init(jax.random.key(4))
    rng = np.random.default_rng(5)
    states = jnp.asarray(rng.standard_normal((2, 7, kw["cross_attention_dim"])), jnp.float32)
    denoiser = on_schedule(NetworkDenoiser(net, "eps", VP), FlowSchedule())

    def u(z, r, t):
        cond = with_student_inputs(
            {"encoder_hidden_states": states}, time_delta=t - r, delta_dim=kw["time_cond_proj_dim"]
        )
        return denoiser.predict(params, z, t, cond).velocity

    def plain(z, t):  # the same UNet without any timestep condition
        return denoiser.predict(params, z, t, {"encoder_hidden_states": states}).velocity

    z = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
    return u, plain, z


def test_unet_meanflow_student_takes_t_minus_r_and_has_a_jvp_in_r_and_t():
    """The UNet's u(z, r, t) depends on r through t - r, equals the UNet without the condition at r = t (the
    embedding of 0 is zero), and forward-mode JVP along (v, dr, dt) through it matches central differences."""
    u, plain, z = unet_meanflow_velocity()
    t = jnp.asarray([0.9, 0.5], jnp.float32)
    np.testing.assert_allclose(time_delta_embedding(jnp.zeros(2), 16), 0.0, atol=1e-7)
    np.testing.assert_allclose(u(z, t, t), plain(z, t), atol=1e-6)
    changed = u(z, jnp.asarray([0.2, 0.1]), t) - u(z, t, t)
    assert float(jnp.abs(changed).max(axis=(1, 2, 3)).min()) > 1e-3  # every sample sees its r
    with pytest.raises(ValueError, match="one timestep_cond"):
        with_student_inputs({"x": t}, guidance=2.0, guidance_dim=16, time_delta=t, delta_dim=16)

    r = jnp.asarray([0.3, 0.2], jnp.float32)
    v = jnp.asarray(np.random.default_rng(6).standard_normal(z.shape), jnp.float32)
    tangents = (v, jnp.asarray([0.4, -0.3]), jnp.ones(2))
    out, tangent = jax.jit(lambda *a: directional_derivative(u, a, tangents, method="jvp"))(z, r, t)
    reference = central_difference(u, (z, r, t), tangents, 1e-4)
    np.testing.assert_allclose(out, u(z, r, t), rtol=1e-4, atol=1e-4)  # jit rounding
    assert rel_err(tangent, reference) < 1e-2
    # the r part alone is nonzero: d/dr reaches the UNet through t - r
    _, du_dr = jax.jvp(lambda r_: u(z, r_, t), (r,), (jnp.ones(2),))
    assert float(jnp.abs(du_dr).max()) > 1e-2


def test_meanflow_unet_student_starts_as_the_teacher_and_trains_its_t_minus_r_projection():
    """configs/meanflow.py:digits: the student is the teacher's UNet with a zero t - r projection, so its
    one-step sample z - u(z, 0, 1) is the teacher's conditional flow step; the loss (du/dt through the UNet) is
    finite and trains that projection; export names why it cannot be done."""
    config = load("configs/meanflow.py:digits", [("batch_size", "4")])
    world = build_world(config)
    recipe = build_recipe(config, world)
    frozen = dict(world.frozen)
    (student,) = recipe.networks
    params = {**frozen, "student": student.initial_params(jax.random.key(0), frozen)}
    start = {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params["student"])[0]
    }
    proj = "['time_embedding']['cond_proj']['kernel']"
    assert start[proj].shape == (64, 32) and not np.any(np.asarray(start[proj]))

    batch = jax.jit(world.prepare)(frozen, world.data.local_batch(0, 4, np.arange(4)))
    key = jax.random.key(3)
    samples = recipe.sample(params, batch["cond"], key)
    z = FlowSchedule().prior_sample(streams(key, "latent")["latent"], samples.shape)
    teacher = on_schedule(world.teacher, FlowSchedule()).predict(frozen["teacher"], z, 1.0, batch["cond"])
    np.testing.assert_allclose(samples, z - teacher.velocity, rtol=1e-4, atol=1e-4)

    update = recipe.updates[0]
    value, grads = jax.jit(
        jax.value_and_grad(lambda p: update.loss({**params, "student": p}, batch, key, Carry(step=0))[0])
    )(params["student"])
    flat_grads = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert np.isfinite(float(value)) and float(jnp.abs(flat_grads[proj]).max()) > 0
    assert "t - r" in recipe.no_diffusers_export


def test_unknown_jvp_method_is_named():
    with pytest.raises(ValueError, match="unknown JVP method 'reverse'"):
        directional_derivative(lambda x: x, (jnp.ones(2),), (jnp.ones(2),), method="reverse")


# ------------------------------------------------------------------------------------------------ closed forms


def test_lcm_grid_and_boundary_scalings():
    grid = np.asarray(skipping_grid(1000, 50))
    assert grid[0] == 19 and grid[-1] == 999 and np.all(np.diff(grid) == 20) and len(grid) == 50
    c_skip, c_out = consistency_scalings(jnp.asarray([0, 1, 999]))
    np.testing.assert_allclose(c_skip, [1.0, 0.25 / (100 + 0.25), 0.25 / (9990.0**2 + 0.25)], rtol=1e-6)
    np.testing.assert_allclose(
        c_out, [0.0, 10 / math.sqrt(100.25), 9990 / math.sqrt(9990.0**2 + 0.25)], rtol=1e-6
    )


def test_guidance_embedding_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline,
    )

    w = np.asarray([1.5, 7.5], np.float32)
    ours = guidance_embedding(jnp.asarray(w), 16)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor(w), 16).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3)  # float32 sinusoids of arguments up to 7500


def test_time_samplers():
    t = trigflow_times(jax.random.key(0), 20000, 0.2, 1.6, 0.5, 1e-3)
    tau = np.log(0.5 * np.tan(np.asarray(t, np.float64)))
    assert abs(tau.mean() - 0.2) < 0.05 and abs(tau.std() - 1.6) < 0.05
    r, t = meanflow_times(jax.random.key(1), 20000, -0.4, 1.0, 0.75)
    r, t = np.asarray(r), np.asarray(t)
    assert np.all(r <= t) and np.all((t > 0) & (t < 1))
    assert abs(np.mean(r == t) - 0.25) < 0.02


# ------------------------------------------------------------------------------------------------ losses by hand

SMALL_NET = [("networks.student.model.width", "32"), ("networks.student.model.hidden", "64")]


def recipe_and_batch(spec: str, overrides=()):
    config = load(spec, [("batch_size", "16"), *SMALL_NET, *overrides])
    world = build_world(config)
    recipe = build_recipe(config, world)
    frozen = dict(world.frozen)
    params = {**frozen}
    for network in recipe.networks:
        params[network.name] = network.initial_params(jax.random.key(7), frozen)
        if network.ema_decay > 0:  # an EMA that differs from the online network
            params[f"{network.name}_ema"] = network.initial_params(jax.random.key(8), frozen)
    batch = world.data.local_batch(0, 16, np.arange(16))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return config, world, recipe, params, batch


def check_loss_and_gradient(recipe, params, batch, key, step, hand):
    """The recipe's loss equals ``hand(params, constants)`` and its gradient equals the gradient of the hand
    loss with the targets held as numbers (where the method puts its stop-gradients)."""
    update = recipe.updates[0]
    trains = update.trains

    def recipe_loss(trainable):
        return update.loss({**params, **trainable}, batch, key, Carry(step=jnp.int32(step)))[0]

    trainable = {n: params[n] for n in trains}
    value, grads = jax.value_and_grad(recipe_loss)(trainable)
    expected_value, constants = hand(params)
    np.testing.assert_allclose(value, expected_value, rtol=1e-4)
    hand_grads = jax.grad(lambda tr: hand({**params, **tr}, constants)[0])(trainable)
    for name in trains:
        for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(hand_grads[name]), strict=True):
            # the hand targets use central differences where the recipe uses forward mode
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * float(jnp.abs(b).max()) + 1e-8)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_lcm_loss_and_stop_gradients_by_hand():
    """Student at (x_t, t) against the EMA network at the teacher's DDIM step (x_s, s), no gradient to the
    target; guidance in LCM's convention and through the student's guidance embedding."""
    config, world, recipe, params, batch = recipe_and_batch("configs/lcm.py:gmm")
    m = config.method
    key = jax.random.key(11)
    net = recipe.networks[0].net
    abar = jnp.asarray(VP.alphas_cumprod, jnp.float32)

    def f(p, x, t, w, cond):
        c_skip, c_out = consistency_scalings(t)
        tin = {"label": cond, "timestep_cond": guidance_embedding(w, 32)}
        x0 = net.apply(p, x, t.astype(jnp.float32), tin)  # an x0-prediction MLP
        return c_skip[:, None] * x + c_out[:, None] * x0

    def hand(p, constants=None):
        k = streams(key, "index", "noise", "guidance")
        x0, cond = batch["x0"], batch["cond"]
        n = x0.shape[0]
        t = (jax.random.randint(k["index"], (n,), 0, 50) + 1) * 20 - 1
        s = jnp.maximum(t - 20, 0)
        eps = jax.random.normal(k["noise"], x0.shape)
        x_t = jnp.sqrt(abar[t])[:, None] * x0 + jnp.sqrt(1 - abar[t])[:, None] * eps
        w = jax.random.uniform(k["guidance"], (n,), minval=1.0, maxval=3.0)
        if constants is None:
            teacher = world.teacher
            c = teacher.predict({}, x_t, t, cond)
            u = teacher.predict({}, x_t, t, jnp.full_like(cond, 2))
            x0_w = c.x0 + w[:, None] * (c.x0 - u.x0)  # y_c + w (y_c - y_u)
            eps_w = c.eps + w[:, None] * (c.eps - u.eps)
            x_s = jnp.sqrt(abar[s])[:, None] * x0_w + jnp.sqrt(1 - abar[s])[:, None] * eps_w
            constants = f(p["student_ema"], x_s, s, w, cond)
        out = f(p["student"], x_t, t, w, cond)
        return jnp.mean(jnp.sqrt((out - constants) ** 2 + m.huber_c**2) - m.huber_c), constants

    check_loss_and_gradient(recipe, params, batch, key, 0, hand)


def test_scm_loss_and_stop_gradients_by_hand():
    """F- and the tangent g from the frozen student (g with central differences along the teacher's ODE
    direction), the learned log-variance weighting, gradients only through F_theta and w(t)."""
    config, world, recipe, params, batch = recipe_and_batch("configs/scm.py:gmm")
    m = config.method
    sd = 0.5
    key = jax.random.key(12)
    student, logvar = recipe.networks
    step = 300

    def big_f(p, x, t, cond):  # a velocity-prediction MLP on TrigFlow: F = out / sd
        return student.net.apply(p, x, t, cond) / sd

    def hand(p, constants=None):
        k = streams(key, "time", "noise", "guidance")
        x0, cond = batch["x0"], batch["cond"]
        n = x0.shape[0]
        tau = m.p_mean + m.p_std * jax.random.normal(k["time"], (n,))
        t = jnp.clip(jnp.arctan(jnp.exp(tau) / sd), m.time_eps, math.pi / 2 - m.time_eps)
        z = jax.random.normal(k["noise"], x0.shape)
        x_t = jnp.cos(t)[:, None] * x0 + sd * jnp.sin(t)[:, None] * z
        if constants is None:
            guided = predict_cfg(world.teacher, {}, x_t, t, cond, world.uncond, 3.0)
            dxdt = -jnp.sin(t)[:, None] * guided.x0 + sd * jnp.cos(t)[:, None] * guided.eps
            cs = jnp.cos(t) * jnp.sin(t)
            f_minus = big_f(p["student"], x_t, t, cond)
            h = 1e-2
            df = (
                cs[:, None]
                * (
                    big_f(p["student"], x_t + h * dxdt, t + h, cond)
                    - big_f(p["student"], x_t - h * dxdt, t - h, cond)
                )
                / (2 * h)
            )
            r = min(1.0, step / m.tangent_warmup_steps)
            g = -(jnp.cos(t) ** 2)[:, None] * (sd * f_minus - dxdt) - r * (cs[:, None] * x_t + sd * df)
            g = g / (jnp.linalg.norm(g, axis=1, keepdims=True) + 0.1)
            constants = f_minus + g
        lv = logvar.net.apply(p["logvar"], t)
        sq = (big_f(p["student"], x_t, t, cond) - constants) ** 2
        value = jnp.mean(jnp.exp(-lv)[:, None] / (sd * jnp.tan(t))[:, None] * sq + lv[:, None])
        return value, constants

    # the log-variance head starts at zero; move it so its gradient path is exercised
    params["logvar"] = jax.tree.map(lambda a: a + 0.1, params["logvar"])
    check_loss_and_gradient(recipe, params, batch, key, step, hand)


@pytest.mark.parametrize("mix", [(1.0, 0.0), (0.8, 0.0), (1.0, 0.5)], ids=["teacher", "omega", "kappa"])
def test_meanflow_loss_and_stop_gradients_by_hand(mix):
    """u_tgt = v~ - (t - r) du/dt with du/dt by central differences along (v~, 0, 1) and T2I-Distill's mix
    v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | 0) of the frozen student on the samples
    that kept their label (dropped ones keep the teacher's v); the adaptive weight and the target carry no
    gradient."""
    config, world, recipe, params, batch = recipe_and_batch(
        "configs/meanflow.py:gmm", [("method.guidance_mix", repr(mix))]
    )
    m = config.method
    key = jax.random.key(13)
    net = recipe.networks[0].net

    def u_fn(p, z, r, t, cond):
        return net.apply(p, z, t, {"label": cond, "time_delta": t - r})

    def hand(p, constants=None):
        k = streams(key, "time", "noise", "dropout")
        x, cond = batch["x0"], batch["cond"]
        n = x.shape[0]
        drop = jax.random.bernoulli(k["dropout"], m.cond_dropout, (n,))
        cond = jnp.where(drop, 2, cond)
        r, t = meanflow_times(k["time"], n, m.time_mean, m.time_std, m.ratio_r_not_t)
        eps = jax.random.normal(k["noise"], x.shape)
        z = (1 - t)[:, None] * x + t[:, None] * eps
        if constants is None:
            guided = predict_cfg(world.teacher, {}, z, t, cond, world.uncond, 3.0)
            omega, kappa = mix
            teacher_v = guided.eps - guided.x0  # flow velocity
            mixed = (
                omega * teacher_v
                + kappa * u_fn(p["student"], z, t, t, cond)
                + (1 - omega - kappa) * u_fn(p["student"], z, t, t, jnp.full_like(cond, 2))
            )
            v = jnp.where(drop[:, None], teacher_v, mixed)  # the mix is for the samples that kept their label
            h = 1e-2
            du = (
                u_fn(p["student"], z + h * v, r, t + h, cond) - u_fn(p["student"], z - h * v, r, t - h, cond)
            ) / (2 * h)
            constants = v - (t - r)[:, None] * du
        sq = jnp.sum((u_fn(p["student"], z, r, t, cond) - constants) ** 2, axis=1)
        weight = jax.lax.stop_gradient(1.0 / (sq + m.adaptive_eps) ** m.adaptive_power)
        return jnp.mean(weight * sq), constants

    check_loss_and_gradient(recipe, params, batch, key, 0, hand)


@pytest.mark.parametrize("spec", ["configs/scm.py:gmm", "configs/meanflow.py:gmm"])
def test_finite_difference_fallback_gives_the_same_loss_and_gradient(spec):
    """``method.jvp=finite_difference`` (for networks whose kernels have no forward mode) trains like the JVP."""
    _, _, recipe, params, batch = recipe_and_batch(spec)
    fd_config = load(spec, [("batch_size", "16"), *SMALL_NET, ("method.jvp", "finite_difference")])
    fd_recipe = build_recipe(fd_config, build_world(fd_config))
    key, carry = jax.random.key(14), Carry(step=jnp.int32(500))
    trains = recipe.updates[0].trains

    def value_and_grad(r):
        def f(trainable):
            return r.updates[0].loss({**params, **trainable}, batch, key, carry)[0]

        return jax.value_and_grad(f)({n: params[n] for n in trains})

    (v, g), (v_fd, g_fd) = value_and_grad(recipe), value_and_grad(fd_recipe)
    np.testing.assert_allclose(v_fd, v, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(g_fd), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3 * float(jnp.abs(b).max()) + 1e-8)
