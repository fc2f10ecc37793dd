"""sCM's optional LADD term (SANA-Sprint's hybrid).

By hand: the hinge loss with misaligned pairs as extra fakes and the R1 penalty (a closed form on linear heads,
central differences on the default heads), the t = pi/2 switch and t_D, and scm's generator gradient through
x0_G = cos t x_t - sin t sd F (a stand-in trunk on the analytic teacher, which has no features: seconds, not
UNet compilations). On the tiny random SD pipeline with captioned images: the heads read the teacher UNet's
down/mid features at the matched DDPM time, the misaligned pairs carry other captions, two full training steps
on 8 fake devices through the real trainer (the term off, then on; only the heads join the state, the teacher
is neither trained nor copied), and the config errors."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SMALL, TINY_RUN, abs_sum, flat, load, logged_metrics, poison_label

from jdistill import configuration, rng, train
from jdistill.diffusion.reparameterize import on_schedule
from jdistill.diffusion.schedules import TrigFlowSchedule
from jdistill.methods import build_recipe, scm
from jdistill.methods.adversarial import (
    TeacherDiscriminator,
    build_teacher_discriminator,
    ladd_config,
    r1_penalty,
)
from jdistill.methods.recipe import Carry, Network
from jdistill.methods.scm import adversarial_times
from jdistill.methods.trajectory import trigflow_times
from jdistill.models.heads import DiscriminatorHeads
from jdistill.models.net import Net
from jdistill.teachers import build_world

LADD_ON = [("method.gan.generator_weight", "0.5"), ("method.gan.discriminator_weight", "0.5")]

# ------------------------------------------------------------------------------------------------ pure pieces

SHAPES = [(8, 8, 2), (4, 4, 8)]


def toy_discriminator(num_down: int, **gan) -> tuple[TeacherDiscriminator, dict]:
    """LADD's discriminator on a stand-in trunk (two feature maps of x_t and a condition vector)."""

    def trunk(w, x_t, t, cond):
        a = x_t * w + cond[:, None, None, :2] + jnp.cos(t)[:, None, None, None]
        return a, jnp.tanh(a.reshape(a.shape[0], 4, 4, 8))

    net = Net(
        "discriminator", lambda rngs: DiscriminatorHeads(SHAPES, hidden=8, num_down=num_down, rngs=rngs)
    )
    disc = TeacherDiscriminator(
        Network(net, optax.sgd(0.1)), trunk, TrigFlowSchedule(0.5), ladd_config(**gan)
    )
    params = {"teacher": jnp.float32(1.3), "discriminator": net.init(jax.random.key(0))}
    return disc, params


def toy_batch(n: int = 3):
    k = jax.random.split(jax.random.key(5), 3)
    real = {"x0": jax.random.normal(k[0], (n, 8, 8, 2)), "cond": jax.random.normal(k[1], (n, 3))}
    return real, 0.5 * jax.random.normal(k[2], (n, 8, 8, 2))


def test_hinge_with_misaligned_fakes_and_r1_by_hand():
    """D = 0.5 (mean_loc relu(1 - D(real)) + mean_loc relu(1 + D([fake, misaligned]))) + r1 R1, with R1 on linear
    heads (1x1 convolutions) in closed form: mean_b sum_h |d sum_loc D_h / d f_h|^2 / heads = sum_h L_h |w_h|^2 / 2."""
    r1 = 0.3
    disc, params = toy_discriminator(0, generator_weight=0.5, discriminator_weight=0.5, r1_weight=r1)
    real, x_fake = toy_batch()
    key = jax.random.key(9)
    n = x_fake.shape[0]
    got, metrics = jax.jit(disc.discriminator_loss)(
        params, x_fake, jnp.ones(n, bool), real, key, Carry(step=0)
    )

    inputs = jax.jit(disc.discriminator_inputs)(x_fake, real, key)
    assert list(inputs) == ["fake", "misaligned", "real"]
    heads = params["discriminator"]["heads"]

    def logits(group):  # by hand: a 1x1 convolution per head, per location
        x_t, t, cond = inputs[group]
        feats = disc.trunk(params["teacher"], x_t, t, cond)
        out = [
            jnp.einsum("bhwc,c->bhw", f, heads[i]["out"]["kernel"][0, 0, :, 0]) + heads[i]["out"]["bias"][0]
            for i, f in enumerate(feats)
        ]
        return np.concatenate([np.asarray(o).reshape(n, -1) for o in out], axis=1)

    real_l, fakes = logits("real"), np.concatenate([logits("fake"), logits("misaligned")])
    hinge = 0.5 * (np.mean(np.maximum(1 - real_l, 0)) + np.mean(np.maximum(1 + fakes, 0)))
    closed = sum(
        np.prod(s[:2]) * float(np.sum(np.asarray(heads[i]["out"]["kernel"]) ** 2))
        for i, s in enumerate(SHAPES)
    ) / len(SHAPES)
    np.testing.assert_allclose(metrics["r1"], closed, rtol=1e-5)
    np.testing.assert_allclose(got, hinge + r1 * closed, rtol=1e-5)
    np.testing.assert_allclose(metrics["gan_d"], 2 * hinge, rtol=1e-5)  # per-sample sum of both means

    # The discriminator's gradient reaches its heads only: not the student's x0, not the teacher (the trunk).
    def d_loss(p, x):
        return disc.discriminator_loss(p, x, jnp.ones(n, bool), real, key, Carry(step=0))[0]

    d_params, d_x = jax.jit(jax.grad(d_loss, argnums=(0, 1)))(params, x_fake)
    assert abs_sum(d_params["discriminator"]) > 0
    assert abs_sum(d_params["teacher"]) == abs_sum(d_x) == 0.0

    # The generator's hinge term is -mean D of its own re-noised x0; its gradient reaches x0, never the heads.
    def g_loss(p, x):
        return disc.generator_loss(p, x, real["cond"], key, jnp.ones(n, bool))[0]

    g_params, g_x = jax.jit(jax.grad(g_loss, argnums=(0, 1)))(params, x_fake)
    assert abs_sum(g_params["discriminator"]) == 0.0 and abs_sum(g_x) > 0
    x_t, t = disc.noised(key, x_fake)
    feats = disc.trunk(params["teacher"], x_t, t, real["cond"])
    want = -np.mean(np.asarray(jax.jit(disc.logits)(params["discriminator"], feats)))
    np.testing.assert_allclose(jax.jit(g_loss)(params, x_fake), want, rtol=1e-5)


def test_r1_penalty_matches_central_differences_on_a_nonlinear_head():
    disc, params = toy_discriminator(1)  # strided convolution, group norm, SiLU, 1x1 convolution
    real, _ = toy_batch(2)
    feats = list(disc.trunk(1.3, real["x0"], jnp.full((2,), 0.7), real["cond"]))

    def heads(fs):
        return disc.heads.net.apply(params["discriminator"], fs)

    got = jax.jit(r1_penalty, static_argnums=0)(heads, feats)
    h, total = 1e-2, 0.0

    @functools.partial(jax.jit, static_argnums=0)
    def derivative(i, e):  # d (each sample's summed logits) / d f_i along e, by central differences
        def at(sign):
            return heads([f + sign * e if k == i else f for k, f in enumerate(feats)]).sum(axis=1)

        return (at(1.0) - at(-1.0)) / (2 * h)

    for i, f in enumerate(feats):
        basis = h * jnp.eye(f[0].size).reshape(-1, *f.shape[1:])
        total = total + jnp.sum(jax.vmap(lambda e, i=i: derivative(i, e))(basis) ** 2, axis=0)
    np.testing.assert_allclose(got, jnp.mean(total) / len(feats), rtol=2e-2)
    assert float(got) > 0


def test_adversarial_times_take_pi_over_2_with_probability_one_half():
    """t_G: sCM's training times, each replaced by pi/2 w.p. max_time_prob; t_D: arctan(e^tau / sd)."""
    m = load("configs/scm.py:sd15_ladd").method
    n = 20000
    t = np.asarray(adversarial_times(jax.random.key(0), n, m))
    top = t == np.float32(math.pi / 2)
    assert abs(top.mean() - 0.5) < 0.015
    # The others are sCM's own training times, from the same stream.
    scm_t = trigflow_times(
        rng.stream(jax.random.key(0), "time"), n, m.p_mean, m.p_std, m.sigma_data, m.time_eps
    )
    np.testing.assert_array_equal(t[~top], np.asarray(scm_t)[~top])
    assert t[~top].max() <= math.pi / 2 - m.time_eps + 1e-6
    other = m.copy_and_resolve_references()
    other.gan.max_time_prob = 0.0
    assert not np.any(
        np.asarray(adversarial_times(jax.random.key(0), 1000, other)) == np.float32(math.pi / 2)
    )
    # t_D: SANA-Sprint's logit_normal_trigflow (-0.6, 1.0) = the logit-normal flow time at the same ratio.
    t_d = np.asarray(trigflow_times(jax.random.key(1), n, -0.6, 1.0, 0.5, 1e-3))
    s = 1 / (1 + 1 / (0.5 * np.tan(t_d)))  # flow time with s / (1 - s) = sd tan t
    logit = np.log(s / (1 - s))
    assert abs(logit.mean() + 0.6) < 0.03 and abs(logit.std() - 1.0) < 0.03


# ------------------------------------------------------------------------------------------------ scm wiring

START = (
    2000  # LADD from this step on; the gmm preset's tangent warm-up (1000 steps) is complete on both sides
)


def gmm_with_stand_in_trunk(monkeypatch):
    """scm:gmm with LADD from step START, its heads on a stand-in trunk (a fixed random feature map of x_t and
    t): the analytic teacher has no features, so only the builder of the discriminator is replaced; the student
    pass, the carry and both updates are scm's own."""
    proj = jax.random.normal(jax.random.key(3), (2, 8))

    def trunk(teacher_params, x_t, t, cond):
        return (jnp.tanh(x_t @ proj + jnp.cos(t)[:, None]),)

    def build(config, world, teacher, time_eps):
        net = Net("discriminator", lambda rngs: DiscriminatorHeads([(8,)], hidden=16, rngs=rngs))
        heads = Network(net, optax.adam(1e-3))
        return TeacherDiscriminator(heads, trunk, teacher.schedule, config.method.gan, time_eps)

    monkeypatch.setattr(scm, "build_teacher_discriminator", build)
    overrides = [("method.gan.r1_weight", "0.1"), ("method.gan.start_step", str(START))]
    config = load("configs/scm.py:gmm", [*SMALL, *LADD_ON, *overrides])
    world = build_world(config)
    recipe = build_recipe(config, world)
    params = dict(world.frozen)
    for i, net in enumerate(recipe.networks):
        params[net.name] = net.initial_params(jax.random.key(i), world.frozen)
    params["logvar"] = jax.tree.map(lambda a: a + 0.1, params["logvar"])  # zero-initialised: give it a slope
    batch = {k: jnp.asarray(v) for k, v in world.data.local_batch(0, 16, np.arange(16)).items()}
    return config, recipe, params, batch, trunk


def _grads(loss, params, names, batch, key):
    """(value, metrics, carry, gradients with respect to ``names``) as a function of the step (one compile)."""

    @jax.jit
    def f(trained, step, carry):
        def value(p):
            return loss({**params, **p}, batch, key, carry.replace(step=step))

        return jax.value_and_grad(value, has_aux=True)(trained)

    def at(step, carry=None):
        (v, (metrics, out)), grads = f(
            {n: params[n] for n in names}, jnp.int32(step), carry or Carry(step=jnp.int32(0))
        )
        return v, metrics, out, grads

    return at


def test_generator_gradient_by_hand_reaches_the_student_not_the_heads(monkeypatch):
    """From START on, the student update's gradient gains 0.5 grad(-mean D(noise(x0_G))) with x0_G = cos t x_t -
    sin t sd F_theta on the real x0 at t_G: through the trunk into the student, never into the heads; the
    discriminator update has gradients for the heads only."""
    config, recipe, params, batch, trunk = gmm_with_stand_in_trunk(monkeypatch)
    m, sd = config.method, config.method.sigma_data
    student, disc = recipe.updates
    assert [n.name for n in recipe.networks] == ["student", "logvar", "discriminator"]
    assert (student.trains, disc.trains) == (("student", "logvar"), ("discriminator",))
    key, names = jax.random.key(4), ("student", "logvar", "discriminator")
    at = _grads(student.loss, params, names, batch, key)
    v_off, m_off, _, g_off = at(START - 1)
    v_on, m_on, out, g_on = at(START)
    np.testing.assert_allclose(v_off, m_off["scm"], rtol=1e-6)
    np.testing.assert_allclose(v_on, m_on["scm"] + 0.5 * m_on["gan_g"], rtol=1e-5)

    student_net, heads = recipe.network("student").net, recipe.network("discriminator").net

    def adversarial(p):  # by hand, with the recipe's streams
        x0, cond = batch["x0"], batch["cond"]
        n = x0.shape[0]
        k = rng.streams(key, "adversarial_time", "adversarial_noise")
        t = adversarial_times(k["adversarial_time"], n, m)[:, None]
        x_t = jnp.cos(t) * x0 + sd * jnp.sin(t) * jax.random.normal(k["adversarial_noise"], x0.shape)
        big_f = student_net.apply(p, x_t, t[:, 0], cond) / sd  # a velocity-prediction MLP on TrigFlow
        x0_g = jnp.cos(t) * x_t - jnp.sin(t) * sd * big_f
        kd = rng.streams(rng.stream(key, "gan"), "time", "noise")
        tau = -0.6 + jax.random.normal(kd["time"], (n,))
        t_d = jnp.clip(jnp.arctan(jnp.exp(tau) / sd), m.time_eps, math.pi / 2 - m.time_eps)
        x_d = jnp.cos(t_d)[:, None] * x0_g + sd * jnp.sin(t_d)[:, None] * jax.random.normal(
            kd["noise"], x0.shape
        )
        return -jnp.mean(heads.apply(params["discriminator"], trunk(None, x_d, t_d, cond)))  # hinge G loss

    value, want = jax.jit(jax.value_and_grad(adversarial))(params["student"])
    np.testing.assert_allclose(m_on["gan_g"], value, rtol=1e-5)
    got = jax.tree.map(lambda a, b: a - b, g_on["student"], g_off["student"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, 0.5 * b, rtol=2e-3, atol=1e-4 * float(jnp.abs(b).max()) + 1e-9)
    assert abs_sum(want) > 0
    assert abs_sum(g_on["discriminator"]) == abs_sum(g_off["discriminator"]) == 0.0
    for a, b in zip(jax.tree.leaves(g_on["logvar"]), jax.tree.leaves(g_off["logvar"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # the log-variance weighting is sCM's alone
    assert out.generated.shape == batch["x0"].shape and bool(jnp.all(out.generated_ok))

    d_value, d_metrics, _, d = _grads(disc.loss, params, names, batch, key)(START, out)
    assert abs_sum(d["discriminator"]) > 0 and abs_sum(d["student"]) == abs_sum(d["logvar"]) == 0.0
    np.testing.assert_allclose(d_value, 0.5 * d_metrics["gan_d"] + 0.1 * d_metrics["r1"], rtol=1e-5)
    assert set(d_metrics) >= {"logit_real", "logit_fake", "logit_misaligned", "r1"}


def test_ladd_counts_the_student_samples_its_heads_leave_out(monkeypatch):
    """A student that is NaN for class 1: the adversarial samples of that class are zeroed for the heads, left
    out of both GAN losses and counted in both updates' nonfinite_rows; the heads' loss stays finite."""
    _, recipe, params, batch, _ = gmm_with_stand_in_trunk(monkeypatch)
    student, disc = recipe.updates
    key, carry = jax.random.key(4), Carry(step=jnp.int32(START))
    assert float(student.loss(params, batch, key, carry)[1][0]["nonfinite_rows"]) == 0.0

    poisoned = {**params, "student": poison_label(params["student"], 1)}
    _, (metrics, out) = student.loss(poisoned, batch, key, carry)
    bad = np.asarray(batch["cond"]) == 1
    assert 0 < bad.sum() < bad.size and float(metrics["nonfinite_rows"]) == bad.sum()
    assert np.asarray(out.generated_ok).tolist() == (~bad).tolist() and np.all(np.isfinite(out.generated))
    d_loss, (d_metrics, _) = disc.loss(params, batch, key, out)
    assert float(d_metrics["nonfinite_rows"]) == bad.sum() and np.isfinite(float(d_loss))


# ------------------------------------------------------------------------------------------------ tiny SD


def ladd_config_on(tiny_pipelines, images, *overrides):
    return load(
        "configs/scm.py:sd15_ladd",
        [
            ("teacher.path", str(tiny_pipelines["sd"])),
            ("teacher.prompts", str(tiny_pipelines["prompts"])),
            ("teacher.data", str(images)),
            *TINY_RUN,
            ("method.gan.feature_layers", "(0, -1)"),  # the tiny UNet has two down blocks: 3 feature maps
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def tiny(tiny_pipelines, images):
    """Config, world and LADD discriminator of sd15_ladd on the tiny pipeline (one device), and a batch of four
    latents with four different conditions (the images fixture's captions all read "a picture numbe" after the
    tiny tokenizer's 16 tokens, so misaligned pairs are shown with distinct stand-in embeddings)."""
    config = ladd_config_on(tiny_pipelines, images, ("mesh.num_devices", "1"))
    world = build_world(config)
    m = config.method
    teacher = on_schedule(world.teacher, TrigFlowSchedule(m.sigma_data), m.data_scale)
    disc = build_teacher_discriminator(config, world, teacher, m.time_eps)
    k = jax.random.split(jax.random.key(0), 2)
    context = np.shape(world.uncond["encoder_hidden_states"])[1:]
    batch = {
        "x0": jax.random.normal(k[0], (4, *world.sample_shape)),
        "cond": {"encoder_hidden_states": jax.random.normal(k[1], (4, *context))},
    }
    return config, world, disc, batch


def test_heads_read_the_teacher_unet_features_at_the_matched_ddpm_time(tiny):
    """TrigFlow (x_t, t) on data c x0 -> the VP UNet at the DDPM time s with sigma_s / alpha_s = sd tan t / c, on
    x_t / |(c cos t, sd sin t)|; the chosen maps are the first down block's output and the mid block's."""
    config, world, disc, batch = tiny
    sd, c = config.method.sigma_data, config.method.data_scale
    t = jnp.asarray([0.2, 0.7, 1.1, 1.5], jnp.float32)
    x_t = 0.6 * batch["x0"]
    cond = batch["cond"]
    got = jax.jit(disc.trunk)(world.frozen["teacher"], x_t, t, cond)
    s = jnp.clip(world.teacher.schedule.time_for_ratio(sd * jnp.tan(t) / c), 0.0, 999.0)
    x_s = x_t / jnp.hypot(c * jnp.cos(t), sd * jnp.sin(t))[:, None, None, None]
    unet = world.nets["teacher"]
    _, every = jax.jit(lambda p: unet.apply(p, x_s, s, cond, return_features=True))(world.frozen["teacher"])
    assert len(every) == 3 and len(got) == 2
    for a, b in zip(got, (every[0], every[-1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
    assert disc.heads.net.num_params() < unet.num_params() / 4  # heads only: the trunk is the teacher's


def test_misaligned_pairs_are_the_real_images_with_other_conditions(tiny):
    config, world, disc, real = tiny
    inputs = jax.jit(disc.discriminator_inputs)(real["x0"], real, jax.random.key(2))
    assert list(inputs) == ["fake", "misaligned", "real"]
    own = np.asarray(real["cond"]["encoder_hidden_states"])
    shown = np.asarray(inputs["misaligned"][2]["encoder_hidden_states"])
    np.testing.assert_array_equal(shown, np.roll(own, 1, axis=0))  # SANA-Sprint: shifted by one
    assert all(
        not np.array_equal(shown[i], own[i]) for i in range(len(own))
    )  # every image, another condition
    for group in ("fake", "real"):
        np.testing.assert_array_equal(inputs[group][2]["encoder_hidden_states"], own)
    assert len({tuple(np.asarray(inputs[g][1])) for g in inputs}) == 3  # each group its own t_D
    off = config.copy_and_resolve_references()
    off.method.gan.misaligned = False
    plain = build_teacher_discriminator(off, world, on_schedule(world.teacher, TrigFlowSchedule(0.5), 0.5))
    assert list(jax.jit(plain.discriminator_inputs)(real["x0"], real, jax.random.key(2))) == ["fake", "real"]


@pytest.mark.e2e  # 96 s from a cold compilation cache; the LADD losses are checked by hand above
def test_ladd_trains_on_eight_devices_and_checkpoints_only_the_heads(tiny_pipelines, images, tmp_path):
    """Two steps through the real trainer, the term off (step 1) then on (step 2): the same compiled step."""
    config = ladd_config_on(
        tiny_pipelines,
        images,
        ("num_steps", "2"),
        ("checkpoint.every", "2"),
        ("method.gan.r1_weight", "1e-5"),
        ("method.gan.start_step", "1"),
        ("networks.student.optimizer.warmup_steps", "0"),  # the preset's warm-up starts at lr 0
    )
    assert config.mesh.num_devices == -1 and jax.device_count() == 8
    workdir = tmp_path / "run"
    train.train(config, str(workdir))
    logged = logged_metrics(workdir)
    off, on = (m for m in logged if "steps_per_sec" in m)
    assert off["discriminator/loss"] == 0.0
    np.testing.assert_allclose(off["student/loss"], off["student/scm"], rtol=1e-6)
    np.testing.assert_allclose(on["student/loss"], on["student/scm"] + 0.5 * on["student/gan_g"], rtol=1e-5)
    d = 0.5 * on["discriminator/gan_d"] + 1e-5 * on["discriminator/r1"]
    np.testing.assert_allclose(on["discriminator/loss"], d, rtol=1e-5)
    assert all(m[f"{u}/skipped"] == 0.0 for m in (off, on) for u in ("student", "discriminator"))
    assert np.isfinite(np.load(workdir / "samples" / "final.npy")).all()

    s, state, n = train.restore_latest(config, str(workdir))
    assert n == 2
    assert set(state["params"]) == {"student", "logvar", "discriminator"}  # no copy of the teacher
    items = set(train._checkpoint_items(state))
    assert items == {"student", "student_opt", "logvar", "logvar_opt", "discriminator", "discriminator_opt"}
    saved = {p.name for p in (workdir / "checkpoints" / "2").iterdir()}
    assert items <= saved and not any("teacher" in name for name in saved)
    heads, teacher = flat(state["params"]["discriminator"]), flat(s.frozen["teacher"])
    assert all(k.startswith("['heads']") for k in heads) and len({k.split("]")[1] for k in heads}) == 2
    assert not set(heads) & set(teacher)

    initial = train.init_train_state(s, rng.stream(jax.random.key(config.seed), "init"))
    for name in ("discriminator", "student"):
        start, now = flat(initial["params"][name]), flat(state["params"][name])
        assert any(not np.array_equal(start[k], now[k]) for k in now), f"{name} did not train"


# ------------------------------------------------------------------------------------------------ errors


def test_config_errors_name_the_problem(tiny):
    gmm = load("configs/scm.py:gmm", [*SMALL, *LADD_ON])
    gmm_world = build_world(gmm)
    with pytest.raises(configuration.ConfigError, match="no 'discriminator' section"):
        build_recipe(gmm, gmm_world)
    gmm.unlock()
    gmm.networks.discriminator = load("configs/scm.py:sd15_ladd").networks.discriminator
    with pytest.raises(configuration.ConfigError, match=r"features of the teacher network.*gmm teacher"):
        build_recipe(gmm, gmm_world)

    config, world, _, _ = tiny
    with pytest.raises(configuration.ConfigError, match=r"needs real samples.*teacher\.data"):
        build_recipe(config, dataclasses.replace(world, data=None))
    bad = config.copy_and_resolve_references()
    bad.method.gan.feature_layers = (0, 3)
    with pytest.raises(configuration.ConfigError, match=r"feature_layers=\(0, 3\).*3 feature maps"):
        build_recipe(bad, world)
    bad.method.gan.feature_layers = (2, -1)
    with pytest.raises(configuration.ConfigError, match="each used at most once"):
        build_recipe(bad, world)
    # Off by default: the gmm preset trains the student and the log-variance head only.
    off = build_recipe(load("configs/scm.py:gmm", SMALL), gmm_world)
    assert [n.name for n in off.networks] == ["student", "logvar"] and [u.name for u in off.updates] == [
        "student"
    ]


def test_sd15_ladd_carries_sana_sprints_settings():
    c = load("configs/scm.py:sd15_ladd")
    m, gan = c.method, c.method.gan
    assert (m.sigma_data, m.data_scale, m.p_mean, m.p_std, m.tangent_warmup_steps) == (
        0.5,
        0.5,
        0.2,
        1.6,
        4000,
    )
    assert tuple(m.guidance_choices) == (4.0, 4.5, 5.0) and m.guidance_embed
    assert (gan.generator_weight, gan.discriminator_weight, gan.main_weight, gan.loss) == (
        0.5,
        0.5,
        1.0,
        "hinge",
    )
    assert (gan.time_mean, gan.time_std, gan.max_time_prob, gan.misaligned, gan.r1_weight) == (
        -0.6,
        1.0,
        0.5,
        True,
        0.0,
    )
    for net in ("student", "discriminator"):
        opt = c.networks[net].optimizer
        assert (opt.lr, opt.weight_decay, opt.grad_clip) == (2e-6, 0.0, 0.1)
    assert c.networks.student.optimizer.warmup_steps == 5000
