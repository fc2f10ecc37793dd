"""DMD2 and SiD recipes on the analytic teacher: where gradients go, and generator gradients recomputed from
the papers' formulas with the mixture's closed-form denoiser."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SMALL, SMALL_SWIFTBRUSH_NETS, gmm_generator_draws, load, poison_label
from helpers import abs_sum as _norm
from helpers import grads_wrt_trained as _grads

from jdistill.diffusion.guidance import cfg_combine
from jdistill.methods import Carry, build_recipe
from jdistill.methods.rollout import FewStepStudent
from jdistill.teachers import build_world


def _setup(spec, *overrides):
    config = load(spec, [*SMALL, *SMALL_SWIFTBRUSH_NETS, *overrides])
    world = build_world(config)
    recipe = build_recipe(config, world)
    params = {"teacher": {}}
    for i, net in enumerate(recipe.networks):
        params[net.name] = net.initial_params(jax.random.fold_in(jax.random.key(3), i), {})
    batch = {"cond": jnp.asarray(np.arange(32) % 2, jnp.int32)}
    return config, world, recipe, params, batch


def _update(recipe, name):
    return next(u for u in recipe.updates if u.name == name)


@pytest.mark.parametrize("spec", ["configs/dmd2.py:gmm", "configs/dmd2.py:gmm_4step"])
def test_dmd2_gradients_go_where_the_paper_puts_them(spec):
    _, _, recipe, params, batch = _setup(spec)
    gen, fake = _update(recipe, "generator"), _update(recipe, "fake_score")
    key = jax.random.key(0)
    g = _grads(gen.loss, params, batch, key)
    assert _norm(g["student"]) > 0 and _norm(g["fake_score"]) == 0.0  # the direction is stop-gradiented
    carry = gen.loss(params, batch, key, Carry(step=0))[1][1]
    f = _grads(fake.loss, params, batch, key, carry)
    assert _norm(f["fake_score"]) > 0 and _norm(f["student"]) == 0.0  # the fake score trains on sg(x)
    assert _norm(_grads(fake.loss, params, batch, key)["student"]) == 0.0  # fake-only (TTUR) steps too
    assert gen.every == recipe_every(spec) and fake.every == 1


def recipe_every(spec):
    return load(spec).method.generator_every


def test_dmd2_generator_gradient_is_the_normalised_x0_difference():
    """grad = J^T g / N with g = (x0_fake - x0_real^w) / mean|x - x0_real^w|, x0_real^w the teacher's CFG."""
    config, world, recipe, params, batch = _setup("configs/dmd2.py:gmm")
    m = config.method
    key = jax.random.key(5)
    schedule, mix = world.teacher.schedule, world.teacher.mixture
    student, fake = recipe.network("student").net, recipe.network("fake_score").net
    cond = batch["cond"]
    n = cond.shape[0]
    d = gmm_generator_draws(schedule, key, n, m.t_range)
    t, a, s = d.t, d.a, d.s
    x, vjp = jax.vjp(lambda p: d.student_x(student, p, cond), params["student"])
    x_t = d.noised(x)
    real = cfg_combine(
        mix.posterior_mean(x_t, a[:, 0], s[:, 0], cond),
        mix.posterior_mean(x_t, a[:, 0], s[:, 0], 2),
        m.guidance_scale,
    )
    v = fake.apply(params["fake_score"], x_t, t.astype(jnp.float32), cond)  # no guidance on the fake score
    fake_x0 = a * x_t - s * v
    g = (fake_x0 - real) / jnp.mean(jnp.abs(x - real), axis=1, keepdims=True)
    (expected,) = vjp(g / x.size)
    got = _grads(_update(recipe, "generator").loss, params, batch, key)["student"]
    for e, o in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(o, e, rtol=2e-3, atol=1e-8)


@pytest.mark.parametrize("spec", ["configs/sid.py:gmm", "configs/sid.py:gmm_4step"])
def test_sid_gradients_go_where_the_paper_puts_them(spec):
    _, _, recipe, params, batch = _setup(spec)
    assert [u.name for u in recipe.updates] == ["fake_score", "generator"]  # fake first, 1:1
    fake, gen = recipe.updates
    key = jax.random.key(0)
    f = _grads(fake.loss, params, batch, key)
    assert _norm(f["fake_score"]) > 0 and _norm(f["student"]) == 0.0  # fake trains on sg(x)
    g = _grads(gen.loss, params, batch, key)
    # The generator loss depends on the fake score (through f_fake): the trainer differentiates only with
    # respect to the student, which is what keeps the fake score's parameters out of the generator step.
    assert _norm(g["student"]) > 0 and _norm(g["fake_score"]) > 0
    assert gen.trains == ("student",) and fake.trains == ("fake_score",)


def test_sid_generator_gradient_flows_through_the_frozen_networks_inputs():
    """The SiD loss recomputed by hand (teacher = exact mixture denoiser with CFG kappa4, fake score with CFG
    kappa2), differentiated with respect to the student with x_t depending on it; and differently from a
    version that stop-gradients x_t."""
    config, world, recipe, params, batch = _setup("configs/sid.py:gmm")
    m = config.method
    key = jax.random.key(7)
    schedule, mix = world.teacher.schedule, world.teacher.mixture
    student, fake = recipe.network("student").net, recipe.network("fake_score").net
    cond = batch["cond"]
    n = cond.shape[0]
    d = gmm_generator_draws(schedule, key, n, m.t_range)
    z, t, eps, a, s = d.z, d.t, d.eps, d.a, d.s

    def hand_loss(p, through_inputs=True):
        x = student.apply(p, z, jnp.full((n,), 999.0), cond)
        x_t = a * (x if through_inputs else jax.lax.stop_gradient(x)) + s * eps
        f_r = cfg_combine(
            mix.posterior_mean(x_t, a[:, 0], s[:, 0], cond),
            mix.posterior_mean(x_t, a[:, 0], s[:, 0], 2),
            m.teacher_guidance,
        )

        def fake_x0(label):
            return a * x_t - s * fake.apply(
                params["fake_score"], x_t, t.astype(jnp.float32), jnp.broadcast_to(label, (n,))
            )

        f_f = cfg_combine(fake_x0(cond), fake_x0(jnp.int32(2)), m.fake_guidance)
        omega = 1.0 / jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x - f_r), axis=1), 1e-5))
        d = f_r - f_f
        return jnp.mean(omega * jnp.sum(d * ((f_r - x) - m.alpha * d), axis=1))

    got = _grads(_update(recipe, "generator").loss, params, batch, key)["student"]
    want = jax.grad(hand_loss)(params["student"])
    for e, o in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(o, e, rtol=2e-3, atol=1e-7)
    detached = jax.grad(lambda p: hand_loss(p, through_inputs=False))(params["student"])
    diff = _norm(jax.tree.map(lambda u, v: u - v, detached, got))
    assert diff > 0.05 * _norm(got), "the gradient through x_t must matter"


def test_sid_zero_cfg_uses_an_unconditional_fake_score():
    _, world, recipe, params, batch = _setup("configs/sid.py:gmm", ("method.fake_condition", "uncond"))
    # Perturb the fake score: its zero-initialised residual branches would hide the label at init.
    leaves, tree = jax.tree.flatten(params["fake_score"])
    keys = jax.random.split(jax.random.key(11), len(leaves))
    params["fake_score"] = jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k_, x.shape) for x, k_ in zip(leaves, keys, strict=True)]
    )
    grads = _grads(_update(recipe, "generator").loss, params, batch, jax.random.key(2))["fake_score"]
    # Under Zero-CFG the generator loss reads the fake score with the null label only.
    emb = np.abs(np.asarray(grads["label_embed"]["embedding"])).sum(axis=1)
    assert emb[world.uncond] > 0 and emb[:2].sum() == 0
    _, _, recipe_c, _, _ = _setup("configs/sid.py:gmm")
    grads_c = _grads(_update(recipe_c, "generator").loss, params, batch, jax.random.key(2))["fake_score"]
    assert np.abs(np.asarray(grads_c["label_embed"]["embedding"]))[:2].sum() > 0  # conditional: labels read


def test_ode_pairs_tool_and_source(tmp_path, capsys):
    from helpers import gmm_quality
    from helpers import tool as load_tool

    from jdistill.data.pairs import PairsSource

    tool = load_tool("make_ode_pairs")
    out = tmp_path / "pairs"
    code = tool.main(
        ["--config=configs/dmd.py:gmm", "--out", str(out), "--count", "96", "--steps", "20", "--batch", "64"]
    )
    assert code == 0 and "wrote 96 pairs" in capsys.readouterr().out
    source = PairsSource.from_dir(str(out), seed=0)
    full = source.local_batch(3, 16)
    assert sorted(full) == ["cond", "x0", "z"] and full["z"].shape == (16, 2)
    again = source.local_batch(3, 16, np.arange(8, 16))  # a host's rows of the same global batch
    for k in full:
        np.testing.assert_array_equal(again[k], full[k][8:])
    # The teacher's guided ODE lands on modes of the pair's own class.
    arrays = {k: np.load(out / f"{k}.npy") for k in ("x0", "cond")}
    within, _, consistent = gmm_quality(arrays["x0"], arrays["cond"])
    assert within > 0.97 and consistent > 0.97
    with pytest.raises(FileNotFoundError, match="make_ode_pairs"):
        PairsSource.from_dir(str(tmp_path))


def test_dmd_generator_loss_adds_the_regression_on_pairs():
    config, world, recipe, params, _ = _setup("configs/dmd.py:gmm", ("method.make_pairs", "64"))
    _, _, recipe2, _, _ = _setup("configs/dmd2.py:gmm", ("method.guidance_scale", "3.0"))
    batch = recipe.source(world).local_batch(0, 32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.key(4)
    student = recipe.network("student").net
    got = _grads(_update(recipe, "generator").loss, params, batch, key)["student"]
    dm = _grads(_update(recipe2, "generator").loss, params, {"cond": batch["cond"]}, key)["student"]

    def regression(p):  # the one-step student from the pair's noise, MSE to the teacher's output
        x = student.apply(p, batch["z"], jnp.full((32,), 999.0), batch["cond"])
        return jnp.mean((x - batch["x0"]) ** 2)

    reg = jax.grad(regression)(params["student"])
    want = jax.tree.map(lambda a, b: a + config.method.regression_weight * b, dm, reg)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="needs teacher ODE pairs"):
        _setup("configs/dmd.py:gmm", ("method.make_pairs", "0"))


@pytest.mark.parametrize(
    ("spec", "teacher_scale", "fake_scale"),
    [
        ("configs/dmd.py:gmm", "guidance_scale", None),
        ("configs/dmd2.py:gmm", "guidance_scale", None),
        ("configs/sid.py:gmm", "teacher_guidance", "fake_guidance"),
        ("configs/sid_lsg.py:gmm", "teacher_guidance", "fake_guidance"),
    ],
)
def test_recipes_record_their_guidance(spec, teacher_scale, fake_scale):
    """Each preset names its CFG convention, its scales, and runs on the world's null-label uncond."""
    import importlib.util

    from helpers import REPO

    config = load(spec)
    assert config.method.cfg_convention == "uncond"
    assert config.method[teacher_scale] > 1
    if fake_scale:
        assert config.method[fake_scale] > 1
    path = REPO / spec.split(":")[0]
    module_spec = importlib.util.spec_from_file_location("cfgdoc", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert "CFG convention" in module.__doc__ and "unconditional input" in module.__doc__
    world = build_world(config)
    assert int(world.uncond) == config.teacher.gmm.num_classes  # the null label


def test_student_input_conventions():
    """SiD-LSG feeds sigma_625 z (a zero image noised to 625); the others feed z itself, labelled t_0."""
    _, world, recipe, _, _ = _setup(
        "configs/sid.py:gmm",
        ("method.student_input", "noised_zero"),
        ("method.student_timesteps", "(625.0,)"),
    )
    abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)  # SD's scaled_linear betas
    assert recipe.student_input_scale == pytest.approx(np.sqrt(1 - abar[625]), rel=1e-6)
    _, _, plain, _, _ = _setup("configs/sid.py:gmm")
    assert plain.student_input_scale == 1.0
    student = FewStepStudent(world.teacher, world.sample_shape, (625.0,), "noised_zero")
    z = world.teacher.schedule.prior_sample(jax.random.key(0), (4, 2))
    np.testing.assert_allclose(student.prior(jax.random.key(0), 4), np.sqrt(1 - abar[625]) * z, rtol=1e-6)
    np.testing.assert_array_equal(
        FewStepStudent(world.teacher, (2,), (399.0,)).prior(jax.random.key(0), 4), z
    )
    with pytest.raises(Exception, match="student_input"):
        load("configs/sid.py:gmm", [("method.student_input", "zeros")])


@pytest.mark.parametrize("spec", ["configs/dmd2.py:gmm", "configs/sid.py:gmm"])
def test_generator_losses_count_the_samples_they_leave_out(spec):
    """A fake score that is NaN for class 1 (half the batch): the generator loss stays finite over the other
    half and reports the 16 samples it left out; with finite networks it reports none."""
    _, _, recipe, params, batch = _setup(spec)
    gen = _update(recipe, "generator")
    key = jax.random.key(1)
    assert float(gen.loss(params, batch, key, Carry(step=0))[1][0]["nonfinite_rows"]) == 0.0
    poisoned = {**params, "fake_score": poison_label(params["fake_score"], 1)}
    loss, (metrics, _) = gen.loss(poisoned, batch, key, Carry(step=0))
    assert float(metrics["nonfinite_rows"]) == 16.0
    assert np.isfinite(float(loss))
    if "dmd2" in spec:  # the direction is a constant: the finite samples' gradient stays finite
        assert np.isfinite(_norm(_grads(gen.loss, poisoned, batch, key)["student"]))
