"""SiD-DiT's settings (arXiv 2509.25127, apple-aiml-research/ml-sid-dit) in the sid recipe: the generator weightings
and the logit-normal flow times against closed forms, the generator and fake-score losses recomputed by hand on the
analytic mixture teacher on the flow path, the flow presets' settings against the released code's numbers, and
short runs of configs/sid.py:sd3_medium and :flux_dev on tiny pipelines exported to StableDiffusion3Pipeline /
FluxPipeline (the student's four-step schedule there draws what jdistill's sampler draws)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SMALL, SMALL_SWIFTBRUSH_NETS, TINY_RUN, load
from helpers import grads_wrt_trained as _grads
from test_export_flow import PROMPTS, pipeline_latents, to_pipeline_layout
from test_recipes_flow import _draws, flow_pipelines  # noqa: F401 (flow_pipelines: a fixture)

from jdistill import export, rng, train
from jdistill.diffusion.guidance import cfg_combine
from jdistill.diffusion.schedules import FlowSchedule
from jdistill.methods import Carry, build_recipe
from jdistill.methods.adversarial import enabled
from jdistill.methods.distribution import (
    GENERATOR_WEIGHTINGS,
    generator_weight,
    logit_normal_times,
    sid_generator_loss,
)
from jdistill.teachers import build_world

LN2 = math.log(2.0)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def test_logit_normal_times_follow_the_stated_density():
    """Histogram of 200k draws against the bin masses of sigmoid(N(ln 2, 1.6^2)) (normal CDF of the logits of the
    bin edges), each within 5 binomial standard deviations; and the logits' mean and std."""
    n = 200_000
    t32 = logit_normal_times(jax.random.key(0), (n,), LN2, 1.6)
    t = np.asarray(t32, np.float64)
    assert t32.dtype == jnp.float32 and ((t > 0) & (t < 1)).all()
    edges = np.linspace(0.0, 1.0, 21)
    logits = np.log(edges[1:-1] / (1.0 - edges[1:-1]))
    cdf = np.concatenate([[0.0], _normal_cdf((logits - LN2) / 1.6), [1.0]])
    mass = np.diff(cdf)
    counts, _ = np.histogram(t, edges)
    sd = np.sqrt(n * mass * (1 - mass))
    assert np.all(np.abs(counts - n * mass) < 5 * sd), np.abs(counts - n * mass) / sd
    z = np.log(t / (1 - t))
    assert abs(z.mean() - LN2) < 0.02 and abs(z.std() - 1.6) < 0.02
    assert abs(np.median(t) - 2 / 3) < 0.01  # sigmoid(ln 2)
    with pytest.raises(ValueError, match="std must be positive"):
        logit_normal_times(jax.random.key(0), (2,), 0.0, 0.0)


def _weight_numpy(kind: str, x: np.ndarray, f_real: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ml-sid-dit's scale_factor per weighting scheme, written out in float64."""
    clip = lambda v: np.maximum(v, 1e-5)  # noqa: E731
    return {
        "sid": 1.0 / clip(np.abs(x - f_real).reshape(len(x), -1).mean(axis=1)),
        "1_minus_sigma": 1.0 - s,
        "1_minus_sigma_squared": (1.0 - s) ** 2,
        "snr_sqrt": 1.0 / clip(s / (1.0 - s)),
        "snr": 1.0 / clip((s / (1.0 - s)) ** 2),
        "1_over_sigma": 1.0 / clip(s),
        "1_over_sigma2": 1.0 / clip(s**2),
    }[kind]


@pytest.mark.parametrize("kind", GENERATOR_WEIGHTINGS)
def test_generator_weights_are_the_codes_functions_and_stop_gradient(kind):
    rng_ = np.random.default_rng(0)
    x = rng_.normal(size=(6, 4, 4, 2)).astype(np.float32)
    f_real = (x + 1e-7 * rng_.normal(size=x.shape)).astype(np.float32)  # first sample: near the floor
    f_real[1:] = rng_.normal(size=x[1:].shape)
    s = np.array([1e-7, 0.05, 0.3, 2 / 3, 0.95, 1 - 1e-6], np.float32)  # both ends exercise the floors
    got = np.asarray(generator_weight(kind, jnp.asarray(x), jnp.asarray(f_real), jnp.asarray(s)))
    want = _weight_numpy(kind, x.astype(np.float64), f_real.astype(np.float64), s.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-5)
    g = jax.grad(lambda x_, s_: generator_weight(kind, x_, jnp.asarray(f_real), s_).sum(), argnums=(0, 1))
    gx, gs = g(jnp.asarray(x), jnp.asarray(s))
    assert not np.asarray(gx).any() and not np.asarray(gs).any()


def test_generator_loss_by_hand_with_the_one_minus_sigma_weight():
    """A 3-sample batch: (1 - t) sum (f_r - f_f)((f_r - x) - alpha (f_r - f_f)); at alpha = 1 the code's own
    form (1 - t) sum (f_r - f_f)(f_f - x)."""
    r = np.random.default_rng(1)
    x, f_r, f_f = (r.normal(size=(3, 2, 2, 4)) for _ in range(3))
    t = np.array([0.2, 0.5, 0.9])
    w = generator_weight("1_minus_sigma", jnp.asarray(x), jnp.asarray(f_r), jnp.asarray(t))
    for alpha in (1.0, 1.2):
        got = np.asarray(sid_generator_loss(jnp.asarray(x), jnp.asarray(f_r), jnp.asarray(f_f), alpha, w))
        want = [
            (1 - t[i]) * np.sum((f_r[i] - f_f[i]) * ((f_r[i] - x[i]) - alpha * (f_r[i] - f_f[i])))
            for i in range(3)
        ]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    code_form = [(1 - t[i]) * np.sum((f_r[i] - f_f[i]) * (f_f[i] - x[i])) for i in range(3)]
    np.testing.assert_allclose(
        np.asarray(sid_generator_loss(jnp.asarray(x), jnp.asarray(f_r), jnp.asarray(f_f), 1.0, w)),
        code_form,
        rtol=1e-5,
    )


# The analytic mixture on the rectified-flow path with SiD-DiT's time sampling and weighting; the fake score
# predicts x0 so that the hand computation reads it directly.
FLOW_GMM = (
    ("teacher.schedule.kind", "flow"),
    ("method.student_timesteps", "(1.0,)"),
    ("method.generator_weighting", "1_minus_sigma"),
    ("method.t_sampling", "logit_normal"),
    ("method.t_logit_normal", f"({LN2}, 1.6)"),
    ("method.fake_t_sampling", "logit_normal"),
    ("method.fake_t_logit_normal", "(-0.5, 1.2)"),
    ("method.fake_cond_dropout", "0.0"),
    ("method.fake_target", "velocity"),
    ("networks.fake_score.prediction", "x0"),
)


def _flow_gmm(*overrides):
    config = load("configs/sid.py:gmm", [*SMALL, *SMALL_SWIFTBRUSH_NETS, *FLOW_GMM, *overrides])
    world = build_world(config)
    recipe = build_recipe(config, world)
    params = {"teacher": {}}
    for i, net in enumerate(recipe.networks):
        params[net.name] = net.initial_params(jax.random.fold_in(jax.random.key(3), i), {})
    leaves, tree = jax.tree.flatten(params["fake_score"])  # away from its zero-initialised output
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params["fake_score"] = jax.tree.unflatten(
        tree, [v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )
    batch = {"cond": jnp.asarray(np.arange(16) % 2, jnp.int32)}
    return config, world, recipe, params, batch


def _update(recipe, name):
    return next(u for u in recipe.updates if u.name == name)


def _sigmoid(v):
    return 1.0 / (1.0 + jnp.exp(-v))


def test_flow_generator_loss_and_gradient_by_hand():
    """SiD's loss on the flow path recomputed from the mixture's posterior mean (CFG kappa4) and the fake x0
    (CFG kappa2) at t = sigmoid(ln 2 + 1.6 n), weight 1 - t; its value and its gradient for the student."""
    config, world, recipe, params, batch = _flow_gmm()
    m = config.method
    mix = world.teacher.mixture
    student, fake = recipe.network("student").net, recipe.network("fake_score").net
    key = jax.random.key(7)
    k = rng.streams(key, "generate", "timestep", "noise")
    cond = batch["cond"]
    n = cond.shape[0]
    z = jax.random.normal(rng.stream(k["generate"], "latent"), (n, 2))
    t = _sigmoid(LN2 + 1.6 * jax.random.normal(k["timestep"], (n,)))
    eps = jax.random.normal(k["noise"], (n, 2))
    a, s = (1.0 - t)[:, None], t[:, None]

    def hand_loss(p):
        x = student.apply(p, z, jnp.full((n,), 1000.0), cond)  # flow time 1 = model time 1000
        x_t = a * x + s * eps
        f_r = cfg_combine(
            mix.posterior_mean(x_t, a[:, 0], s[:, 0], cond),
            mix.posterior_mean(x_t, a[:, 0], s[:, 0], world.uncond),
            m.teacher_guidance,
        )

        def fake_x0(label):
            return fake.apply(params["fake_score"], x_t, 1000.0 * t, jnp.broadcast_to(label, (n,)))

        f_f = cfg_combine(fake_x0(cond), fake_x0(jnp.int32(world.uncond)), m.fake_guidance)
        d = f_r - f_f
        return jnp.mean((1.0 - t) * jnp.sum(d * ((f_r - x) - m.alpha * d), axis=1))

    gen = _update(recipe, "generator")
    got_loss = gen.loss(params, batch, key, Carry(step=0))[0]
    np.testing.assert_allclose(float(got_loss), float(hand_loss(params["student"])), rtol=1e-4)
    got = _grads(gen.loss, params, batch, key)["student"]
    want = jax.grad(hand_loss)(params["student"])
    for e, o in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(o, e, rtol=2e-3, atol=1e-7)


def test_flow_fake_score_loss_by_hand_at_logit_normal_times():
    """The fake score's velocity MSE on sg(x) at t = sigmoid(-0.5 + 1.2 n) (its own logit-normal), by hand."""
    _, _, recipe, params, batch = _flow_gmm()
    student, fake = recipe.network("student").net, recipe.network("fake_score").net
    key = jax.random.key(9)
    k = rng.streams(key, "generate", "timestep", "noise", "dropout", "gan")
    cond = batch["cond"]
    n = cond.shape[0]
    z = jax.random.normal(rng.stream(k["generate"], "latent"), (n, 2))
    x = student.apply(params["student"], z, jnp.full((n,), 1000.0), cond)
    t = _sigmoid(-0.5 + 1.2 * jax.random.normal(k["timestep"], (n,)))
    eps = jax.random.normal(k["noise"], (n, 2))
    x_t = (1.0 - t)[:, None] * x + t[:, None] * eps
    x0 = fake.apply(params["fake_score"], x_t, 1000.0 * t, cond)  # kappa1 = 1: the conditional prediction
    v_pred = (x_t - x0) / t[:, None]  # velocity of an x0 prediction on x_t = (1 - t) x0 + t eps
    want = jnp.mean(jnp.mean((v_pred - (eps - x)) ** 2, axis=1))
    got = _update(recipe, "fake_score").loss(params, batch, key, Carry(step=0))[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            ("method.generator_weighting", "sid_legacy"),
            "'method.generator_weighting' has value 'sid_legacy'; valid choices",
        ),
        (("method.t_sampling", "lognormal"), "'method.t_sampling' has value 'lognormal'; valid choices"),
        (("method.renoise", "ddim"), "'method.renoise' has value 'ddim'; valid choices"),
        (("method.fake_t_logit_normal", "(0.0, -1.0)"), r"fake_t_logit_normal=.*std > 0"),
    ],
)
def test_bad_settings_are_refused_by_name(override, message):
    with pytest.raises(ValueError, match=message):
        _flow_gmm(override)


@pytest.mark.parametrize(
    "override", [("method.generator_weighting", "1_minus_sigma"), ("method.fake_t_sampling", "logit_normal")]
)
def test_flow_time_settings_need_a_flow_teacher(override):
    config = load("configs/sid.py:gmm", [*SMALL, *SMALL_SWIFTBRUSH_NETS, override])
    with pytest.raises(ValueError, match=r"need a flow-matching teacher.*VPSchedule"):
        build_recipe(config, build_world(config))


# ml-sid-dit (commit 9596ed9): run_sid_dit.sh, sid_dit_{sd3,flux}_train.py, training/sid_dit_*_training_loop.py,
# sid_dit_*_util.py, README. Recorded numbers; configs/sid.py's docstring names the lines.
SID_DIT_SOURCE = {
    "betas": (0.0, 0.999),  # *_train.py: betas=[0.0, 0.999] for both optimizers
    "eps": 1e-8,  # eps=1e-8 when neither --fp16 nor --bf16 (README: AMP)
    "lr": 1e-6,  # README, AMP + FSDP: lr = glr = 1e-6
    "batch": 256,  # --batch 256
    "mimg": 1.0,  # run_sid_dit.sh --duration 1
    "kappa": 4.5,  # --cfg_train_fake / --cfg_eval_fake / --cfg_eval_real 4.5
    "alpha": 1.0,  # --alpha 1.0
    "times": (1.0, 0.75, 0.5, 0.25),  # 999 (1 - i / 4) / 999
    "logit_normal": (math.log(2.0), 1.6),  # logit_mean = log(2.0), logit_std = 1.6
    "weighting": "1_minus_sigma",  # --weighting_scheme default
    "resolution": 512,  # --resolution 512
    "t5": {
        "sd3": 77,
        "flux": 512,
    },  # tokenize_prompt max_length=77; FLUX encode_prompt max_sequence_length=512
}


@pytest.mark.parametrize("preset", ["sd3_medium", "sd35_medium", "sd35_large", "flux_dev"])
def test_sid_dit_presets_carry_the_released_settings(preset):
    src = SID_DIT_SOURCE
    c = load(f"configs/sid.py:{preset}")
    m = c.method
    assert c.teacher.kind == "flow" and c.teacher.preset == preset
    for name in ("student", "fake_score"):
        opt = c.networks[name].optimizer
        assert (opt.name, opt.b1, opt.b2, opt.eps, opt.lr) == ("adam", *src["betas"], src["eps"], src["lr"])
        assert (opt.grad_clip, opt.weight_decay, opt.warmup_steps) == (0.0, 0.0, 0)
        assert c.networks[name].prediction == "velocity"
    assert c.networks.student.ema_decay == 0.0
    assert c.batch_size == src["batch"] and c.num_steps == math.ceil(src["mimg"] * 1e6 / src["batch"])
    assert (m.teacher_guidance, m.fake_guidance, m.fake_train_guidance) == (src["kappa"],) * 3
    assert m.cfg_convention == "uncond" and m.fake_condition == "cond" and m.fake_cond_dropout == 0.0
    assert m.alpha == src["alpha"] and tuple(m.student_timesteps) == src["times"]
    assert m.student_input == "noise" and m.renoise == "fresh"
    assert (m.t_sampling, m.fake_t_sampling) == ("logit_normal", "logit_normal")
    assert tuple(m.t_logit_normal) == tuple(m.fake_t_logit_normal) == src["logit_normal"]
    assert m.generator_weighting == src["weighting"]
    assert (m.fake_target, m.fake_weighting) == ("velocity", "uniform")
    assert not enabled(m.gan)
    assert c.teacher.resolution == src["resolution"]
    assert c.teacher.t5_length == src["t5"]["flux" if preset.startswith("flux") else "sd3"]


def test_flux_extrapolations_and_the_other_presets_unchanged():
    schnell, lite = load("configs/sid.py:flux_schnell"), load("configs/sid.py:flux_lite")
    assert schnell.method.teacher_guidance == 1.0 and schnell.teacher.t5_length == 256
    assert lite.method.teacher_guidance == 4.5 and lite.teacher.t5_length == 512
    for spec in ("configs/sid.py:sd15_4step", "configs/sid.py:gmm_4step", "configs/sid.py:digits_4step"):
        m = load(spec).method
        assert (m.generator_weighting, m.t_sampling, m.fake_t_sampling) == ("sid", "uniform", "uniform")


def _run_and_export(preset, flow_pipelines, tmp_path, monkeypatch):  # noqa: F811
    spec = f"configs/sid.py:{preset}"
    config = load(
        spec,
        [
            ("teacher.path", str(flow_pipelines[preset])),
            ("teacher.prompts", str(flow_pipelines["prompts"])),
            *TINY_RUN,
            ("teacher.resolution", "16"),
            ("num_steps", "2"),
        ],
    )
    run = str(tmp_path / "run")
    assert train.train(config, run)["finite"] == 1.0
    s, state, step = train.restore_latest(config, run)
    assert step == 2
    dst = export.export_run(config, run, str(tmp_path / "export"))
    record = json.loads((tmp_path / "export" / "jdistill_export.json").read_text())
    call = record["call"]
    assert call["sigmas"] == [1.0, 0.75, 0.5, 0.25] and call["guidance_scale"] == 1.0  # the student: no CFG
    assert call["max_sequence_length"] == config.teacher.t5_length == (512 if preset == "flux_dev" else 77)
    sched = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["stochastic_sampling"] and sched["shift"] == 1.0 and not sched["use_dynamic_shifting"]
    params = train.sampling_params(s, state)
    key = jax.random.key(11)
    cond = jax.jit(s.world.prepare)(params, s.world.conditions.tokenize(PROMPTS))["cond"]
    ours = np.asarray(jax.jit(s.recipe.sample)(params, cond, key))
    z, noises = _draws(s, config, key, ours.shape)
    kind, theirs = pipeline_latents(
        dst, preset, z * record["latents_scale"], record["call"], noises, None, monkeypatch
    )
    assert kind == ("FluxPipeline" if preset.startswith("flux") else "StableDiffusion3Pipeline")
    want = to_pipeline_layout(preset, ours)
    assert np.isfinite(theirs).all()
    assert np.abs(theirs - want).max() / np.abs(want).max() < 1e-3


@pytest.mark.e2e
@pytest.mark.parametrize("preset", ["sd3_medium", "flux_dev"])
def test_sid_dit_preset_trains_and_exports_its_four_step_schedule(
    preset,
    flow_pipelines,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    _run_and_export(preset, flow_pipelines, tmp_path, monkeypatch)


class _ToyDenoiser:
    """x0 = w tanh(x_t) (1 + t): a smooth stand-in for the student on the flow path."""

    schedule = FlowSchedule()

    def predict(self, params, x_t, t, cond):
        return SimpleNamespace(x0=params * jnp.tanh(x_t) * (1.0 + t[:, None]))


def test_step_count_mixture_is_uniform_and_rolls_out_sid_dits_steps():
    """k ~ U{1..4} (index 0..3) once per update, the same for the whole batch; the trained step's input is the
    student's own k - 1 steps at t_i = 1 - i/4 from pure noise with fresh noise between them, redone by hand."""
    from jdistill.config_base import FLOW_FOUR_STEPS
    from jdistill.methods.rollout import FewStepStudent, draw_step_index

    draws = jax.vmap(lambda k: draw_step_index(k, 4))(jax.random.split(jax.random.key(0), 4000))
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts.sum() == 4000 and np.all(np.abs(counts - 1000) < 5 * math.sqrt(4000 * 0.25 * 0.75)), counts
    student = FewStepStudent(_ToyDenoiser(), (2,), FLOW_FOUR_STEPS)
    w, n, cond = 0.8, 5, jnp.zeros((5,))
    seen = set()
    for i in range(12):
        key = jax.random.key(100 + i)
        k = rng.streams(key, "latent", "step_index", "simulate")
        index = int(draw_step_index(k["step_index"], 4))
        seen.add(index)
        x = np.asarray(jax.random.normal(k["latent"], (n, 2)), np.float64)  # pure noise at t = 1
        times = [1.0 - j / 4 for j in range(4)]
        for j in range(index):  # predict x0, re-noise to the next time with a fresh draw
            x0 = w * np.tanh(x) * (1.0 + times[j])
            fresh = np.asarray(jax.random.normal(jax.random.fold_in(k["simulate"], j), (n, 2)))
            x = (1.0 - times[j + 1]) * x0 + times[j + 1] * fresh
        want = w * np.tanh(x) * (1.0 + times[index])
        np.testing.assert_allclose(np.asarray(student.generate(w, cond, key)), want, rtol=1e-5, atol=1e-6)
    assert seen == {0, 1, 2, 3}
