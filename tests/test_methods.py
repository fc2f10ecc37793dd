"""Losses of the methods against independent computations, and where their gradients go."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import abs_sum as _norm
from helpers import gmm_generator_draws, load, poison_label, small_swiftbrush
from helpers import grads_wrt_trained as _grads

from jdistill import rng
from jdistill.diffusion.guidance import cfg_combine
from jdistill.diffusion.parameterization import to_prediction
from jdistill.diffusion.schedules import VPSchedule, sample_timesteps
from jdistill.methods import Carry, build_recipe
from jdistill.methods.common import denoising_loss, loss_weight, pseudo_target_loss
from jdistill.teachers import build_world


def test_pseudo_target_gradient_is_direction_over_size():
    x = jax.random.normal(jax.random.key(0), (4, 3, 2))
    g = jax.random.normal(jax.random.key(1), (4, 3, 2))
    grad = jax.grad(pseudo_target_loss)(x, g)
    np.testing.assert_allclose(grad, g / x.size, rtol=1e-6)
    # Its value is 0.5 mean(g^2): the loss is a proxy, only its gradient matters.
    np.testing.assert_allclose(pseudo_target_loss(x, g), 0.5 * np.mean(np.asarray(g) ** 2), rtol=1e-6)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["uniform", "alpha2", "snr"])
def test_denoising_loss_is_weighted_mse(target, weighting):
    schedule = VPSchedule.from_betas()
    x0 = np.random.default_rng(0).normal(size=(5, 2))
    eps = np.random.default_rng(1).normal(size=(5, 2))
    t = np.array([0, 100, 400, 800, 999])
    abar = schedule.alphas_cumprod[t][:, None]
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    x_t = a * x0 + s * eps
    out = np.random.default_rng(2).normal(size=(5, 2))  # an eps-prediction network output
    pred = to_prediction(jnp.asarray(out), "eps", jnp.asarray(x_t, jnp.float32), schedule, jnp.asarray(t))
    x0_hat = (x_t - s * out) / a
    truth = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[target]
    guess = {"eps": out, "x0": x0_hat, "v": a * out - s * x0_hat}[target]
    w = {"uniform": np.ones(5), "alpha2": a[:, 0] ** 2, "snr": (a / s)[:, 0] ** 2}[weighting]
    expected = np.mean(w * np.mean((guess - truth) ** 2, axis=1))
    got = denoising_loss(pred, jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), target, weighting)
    np.testing.assert_allclose(got, expected, rtol=2e-4)
    assert loss_weight(weighting, pred).shape == (5,)


def _swiftbrush(*overrides):
    config = small_swiftbrush(*overrides)
    world = build_world(config)
    recipe = build_recipe(config, world)
    key = jax.random.key(3)
    params = {"teacher": {}}
    for i, net in enumerate(recipe.networks):
        params[net.name] = net.initial_params(jax.random.fold_in(key, i), {})
    batch = {"cond": jnp.asarray(np.arange(32) % 2, jnp.int32)}
    return config, world, recipe, params, batch


def test_swiftbrush_stop_gradients():
    _, _, recipe, params, batch = _swiftbrush()
    gen, fake = recipe.updates
    key = jax.random.key(0)
    g = _grads(gen.loss, params, batch, key)
    assert _norm(g["student"]) > 0 and _norm(g["fake_score"]) == 0.0  # the direction is a constant
    carry = gen.loss(params, batch, key, Carry(step=0))[1][1]
    f = _grads(fake.loss, params, batch, key, carry)
    assert _norm(f["fake_score"]) > 0 and _norm(f["student"]) == 0.0  # trained on sg(x)
    f_nocarry = _grads(fake.loss, params, batch, key)  # regenerates x itself when no carry: still sg
    assert _norm(f_nocarry["student"]) == 0.0


def _vsd_direction_by_hand(config, world, recipe, params, batch, key):
    """(g, x, vjp): SwiftBrush's direction g = sigma_t^2 (eps_teacher^w - eps_fake^w) at the student's samples x,
    recomputed from the networks and the mixture, and the student's VJP at x."""
    m = config.method
    schedule, mix = world.teacher.schedule, world.teacher.mixture
    student = recipe.network("student").net
    fake = recipe.network("fake_score").net
    cond = batch["cond"]
    n = cond.shape[0]
    d = gmm_generator_draws(schedule, key, n, m.t_range)
    t, a, s = d.t, d.a, d.s
    x, vjp = jax.vjp(lambda p: d.student_x(student, p, cond), params["student"])
    x_t = d.noised(x)

    def teacher_eps(label):
        x0 = mix.posterior_mean(x_t, a[:, 0], s[:, 0], label)
        return (x_t - a * x0) / s

    def fake_eps(label):
        v = fake.apply(params["fake_score"], x_t, t.astype(jnp.float32), jnp.broadcast_to(label, (n,)))
        return s * x_t + a * v  # v-prediction -> eps

    w = m.guidance_scale
    eps_t = cfg_combine(teacher_eps(cond), teacher_eps(jnp.int32(2)), w)
    eps_f = cfg_combine(fake_eps(cond), fake_eps(jnp.int32(2)), w)
    return s**2 * (eps_t - eps_f), x, vjp


def test_swiftbrush_generator_gradient_is_the_vsd_direction():
    """grad_theta L = J_theta(x)^T g / N with g = sigma_t^2 (eps_teacher^w - eps_fake^w), recomputed here."""
    config, world, recipe, params, batch = _swiftbrush()
    gen = recipe.updates[0]
    key = jax.random.key(5)
    g, x, vjp = _vsd_direction_by_hand(config, world, recipe, params, batch, key)
    (expected,) = vjp(g / x.size)
    got = _grads(gen.loss, params, batch, key)["student"]
    for e, o in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(o, e, rtol=2e-3, atol=1e-8)


def test_swiftbrush_generator_leaves_out_and_counts_nonfinite_directions():
    """A fake score that is NaN for class 1: those samples are counted, and the loss and gradient are the
    finite samples' alone (recomputed by hand on them)."""
    config, world, recipe, clean, batch = _swiftbrush()
    params = {**clean, "fake_score": poison_label(clean["fake_score"], 1)}
    gen = recipe.updates[0]
    key = jax.random.key(5)
    g, _, vjp = _vsd_direction_by_hand(config, world, recipe, params, batch, key)
    good = np.all(np.isfinite(np.asarray(g)), axis=1)
    assert good.tolist() == (np.asarray(batch["cond"]) != 1).tolist()  # the poison reaches class 1 only
    loss, (metrics, _) = gen.loss(params, batch, key, Carry(step=0))
    assert float(metrics["nonfinite_rows"]) == 16.0
    g_good = np.asarray(g)[good]
    np.testing.assert_allclose(loss, 0.5 * np.mean(g_good**2), rtol=1e-4)
    np.testing.assert_allclose(metrics["direction_norm"], np.mean(np.abs(g_good)), rtol=1e-5)
    (expected,) = vjp(jnp.where(good[:, None], g, 0.0) / g_good.size)
    got = _grads(gen.loss, params, batch, key)["student"]
    for e, o in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(o, e, rtol=2e-3, atol=1e-8)
    # Finite parameters: nothing is counted.
    assert float(gen.loss(clean, batch, key, Carry(step=0))[1][0]["nonfinite_rows"]) == 0.0


def test_swiftbrush_fake_score_loss_leaves_out_and_counts_nonfinite_samples():
    """Carried samples with NaN rows, two noisings each: 2 x 3 rows counted; the loss is the uniform v-MSE of
    the other rows, recomputed by hand with the loss's own draws."""
    config, world, recipe, params, batch = _swiftbrush(("method.fake_noise_draws", "2"))
    m = config.method
    fake_update = recipe.updates[1]
    key = jax.random.key(7)
    n = batch["cond"].shape[0]
    x = jax.random.normal(jax.random.key(8), (n, 2))
    bad = np.zeros(n, bool)
    bad[[3, 10, 31]] = True
    x_carried = jnp.where(bad[:, None], jnp.nan, x)
    loss, (metrics, _) = fake_update.loss(params, batch, key, Carry(step=0, generated=x_carried))
    assert float(metrics["nonfinite_rows"]) == 6.0
    np.testing.assert_allclose(metrics["finite_samples"], 29 / 32)

    # By hand: the loss's draws for 2n rows (x's bad rows zeroed, as the networks see them).
    schedule = world.teacher.schedule
    fake = recipe.network("fake_score").net
    k = rng.streams(key, "generate", "timestep", "noise", "dropout", "gan")
    x2 = jnp.concatenate([jnp.where(bad[:, None], 0.0, x)] * 2)
    cond2 = jnp.concatenate([batch["cond"]] * 2)
    t = sample_timesteps(schedule, k["timestep"], (2 * n,), *m.fake_t_range)
    eps = jax.random.normal(k["noise"], x2.shape, jnp.float32)
    drop = jax.random.bernoulli(k["dropout"], m.fake_cond_dropout, (2 * n,))
    label = jnp.where(drop, 2, cond2)
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t][:, None]
    a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    v_pred = fake.apply(params["fake_score"], a * x2 + s * eps, t.astype(jnp.float32), label)
    per_row = np.mean((np.asarray(v_pred) - np.asarray(a * eps - s * x2)) ** 2, axis=1)
    keep = ~np.concatenate([bad, bad])
    np.testing.assert_allclose(loss, per_row[keep].mean(), rtol=1e-4)


def test_swiftbrush_fake_equal_to_teacher_gives_no_gradient():
    # A zero-initialised residual on the teacher is the teacher: the VSD direction vanishes.
    _, _, recipe, params, batch = _swiftbrush(
        ("method.fake_score_init", "teacher_residual"), ("networks.fake_score.prediction", "eps")
    )
    g = _grads(recipe.updates[0].loss, params, batch, jax.random.key(0))
    assert _norm(g["student"]) < 1e-6 * _norm(params["student"])


def test_swiftbrush_records_cfg_convention():
    cfg = load("configs/swiftbrush.py:gmm")
    assert cfg.method.cfg_convention == "uncond"  # SwiftBrush: y_u + w (y_c - y_u), on teacher and fake score
    assert cfg.method.guidance_scale > 1


def test_sft_stop_gradient_and_target():
    config = load(
        "configs/sft.py:gmm", [("networks.model.model.width", "32"), ("networks.model.model.depth", "1")]
    )
    world = build_world(config)
    recipe = build_recipe(config, world)
    net = recipe.networks[0]
    params = {"teacher": {}, "model": net.initial_params(jax.random.key(0), {})}
    x0, labels = world.teacher.mixture.sample(np.random.default_rng(0), 16)
    batch = {"x0": jnp.asarray(x0), "cond": jnp.asarray(labels)}
    loss = recipe.updates[0].loss
    value, _ = loss(params, batch, jax.random.key(1), {})
    # Recompute: eps-prediction MSE with the same streams.
    k = rng.streams(jax.random.key(1), "timestep", "noise", "dropout")
    from jdistill.methods.common import drop_conditions

    cond = drop_conditions(k["dropout"], batch["cond"], world.uncond, config.method.cond_dropout)
    t = sample_timesteps(world.teacher.schedule, k["timestep"], (16,), 0.0, 1.0)
    eps = jax.random.normal(k["noise"], x0.shape)
    abar = jnp.asarray(world.teacher.schedule.alphas_cumprod, jnp.float32)[t][:, None]
    x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * eps
    out = net.net.apply(params["model"], x_t, t.astype(jnp.float32), cond)
    np.testing.assert_allclose(value, jnp.mean((out - eps) ** 2), rtol=1e-5)
