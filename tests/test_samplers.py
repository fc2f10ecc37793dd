"""Samplers against diffusers' scheduler loops and independent numpy loops.

The denoiser is a fixed smooth analytic model written twice, in torch (for diffusers) and in jax.numpy (for
jdistill). jdistill's VP schedule is built from the diffusers scheduler's own float32 alphas_cumprod, so the
comparisons measure the samplers, not the table rounding (tested in test_schedules.py).
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
from tiny_configs import SD_BETAS

from jdistill.diffusion.parameterization import to_prediction
from jdistill.diffusion.samplers import (
    SamplerPlan,
    ddim_plan,
    ddim_timesteps,
    flow_euler_plan,
    flow_sigmas,
    run_sampler,
    student_plan,
)
from jdistill.diffusion.schedules import FlowSchedule, TrigFlowSchedule, VPSchedule, flux_mu

SHAPE = (2, 3, 4, 4)
DIFFUSERS_KIND = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


# Near t = 999 the model returns ~x (as a good eps-predictor does there), which keeps x0 = (x - sigma eps) /
# alpha and hence every sample O(1); near t = 0 it still depends on x (0.2 x), so an x0-prediction run's
# final sample depends on the whole trajectory.
def torch_model(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return x * (0.2 + 0.8 * torch.sin(t / 640)) + 0.1 * torch.cos(t / 300)


def jax_model(x, t):
    t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return x * (0.2 + 0.8 * jnp.sin(t / 640)) + 0.1 * jnp.cos(t / 300)


def initial_noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def make_denoise(schedule, kind, model=jax_model):
    def denoise(x_t, t):
        return to_prediction(model(x_t, schedule.model_time(t)), kind, x_t, schedule, t)

    return denoise


def step_noises(key, n, shape=SHAPE):
    """The noise run_sampler draws at step i: normal(split(key, n)[i], shape, float32)."""
    keys = jax.random.split(key, n)
    return [np.array(jax.random.normal(keys[i], shape, jnp.float32)) for i in range(n)]


def feed_step_noises(monkeypatch, scheduler_module: str, key, n) -> list[tuple[int, ...]]:
    """Make a diffusers scheduler module's ``randn_tensor`` return ``step_noises(key, n)`` in turn; the list
    returned collects the shapes it was asked for."""
    noises = iter(step_noises(key, n))
    calls = []

    def fake_randn(shape, generator=None, device=None, dtype=None, **kwargs):
        calls.append(tuple(shape))
        return torch.from_numpy(next(noises)).to(dtype)

    monkeypatch.setattr(importlib.import_module(scheduler_module), "randn_tensor", fake_randn)
    return calls


def ddim_scheduler(**kwargs):
    config = dict(SD_BETAS, clip_sample=False)
    config.update(kwargs)
    return DDIMScheduler(**config)


def vp_from(scheduler):
    return VPSchedule(alphas_cumprod=scheduler.alphas_cumprod.numpy().astype(np.float64))


# --------------------------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("n", [1, 3, 4, 10, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_match_diffusers(spacing, n, steps_offset):
    scheduler = ddim_scheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    scheduler.set_timesteps(n)
    ours = ddim_timesteps(n, 1000, spacing, steps_offset)
    np.testing.assert_array_equal(ours, scheduler.timesteps.numpy())
    assert ours.dtype == np.int64


def test_ddim_timesteps_other_train_lengths():
    for spacing in ("leading", "trailing", "linspace"):
        scheduler = ddim_scheduler(num_train_timesteps=500, timestep_spacing=spacing, steps_offset=1)
        scheduler.set_timesteps(7)
        np.testing.assert_array_equal(ddim_timesteps(7, 500, spacing, 1), scheduler.timesteps.numpy())


def test_ddim_timesteps_validation():
    with pytest.raises(ValueError, match="unknown timestep spacing 'uniform'"):
        ddim_timesteps(4, 1000, "uniform")
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\], got 0"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\], got 1001"):
        ddim_timesteps(1001)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_plan_coefficients(set_alpha_to_one):
    scheduler = ddim_scheduler(set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    schedule = vp_from(scheduler)
    plan = ddim_plan(schedule, 4, "leading", 1, set_alpha_to_one)
    abar = scheduler.alphas_cumprod.numpy().astype(np.float64)
    np.testing.assert_array_equal(plan.timesteps, [751, 501, 251, 1])
    prev = np.array([501, 251, 1])
    final = 1.0 if set_alpha_to_one else abar[0]
    next_abar = np.append(abar[prev], final)
    np.testing.assert_allclose(plan.next_alpha, np.sqrt(next_abar), rtol=1e-14)
    np.testing.assert_allclose(plan.next_sigma, np.sqrt(1 - next_abar), rtol=1e-14, atol=1e-15)
    abar_t = abar[plan.timesteps]
    # DDIM eq. (16) at eta = 1.
    std = np.sqrt((1 - next_abar) / (1 - abar_t)) * np.sqrt(1 - abar_t / next_abar)
    np.testing.assert_allclose(plan.ddim_std_ratio, std, rtol=1e-12, atol=1e-15)
    assert len(plan) == 4


# (prediction type, spacing, steps, steps_offset, set_alpha_to_one): every type with every spacing, both
# settings of set_alpha_to_one, and a 50-step run.
DDIM_CASES = [
    ("eps", "leading", 10, 1, True),
    ("eps", "trailing", 4, 0, False),
    ("eps", "linspace", 3, 0, True),
    ("eps", "leading", 50, 1, False),
    ("v", "leading", 4, 0, False),
    ("v", "trailing", 10, 0, True),
    ("v", "linspace", 4, 0, False),
    ("x0", "leading", 4, 1, True),
    ("x0", "trailing", 3, 0, False),
    ("x0", "linspace", 10, 0, True),
]


def diffusers_ddim_loop(scheduler, x, n, eta=0.0, noises=None):
    scheduler.set_timesteps(n)
    sample = torch.from_numpy(x)
    for i, t in enumerate(scheduler.timesteps):
        noise = None if noises is None else torch.from_numpy(noises[i])
        sample = scheduler.step(torch_model(sample, t), t, sample, eta=eta, variance_noise=noise).prev_sample
    return sample.numpy()


@pytest.mark.parametrize(("kind", "spacing", "n", "steps_offset", "set_alpha_to_one"), DDIM_CASES)
def test_ddim_loop_matches_diffusers(kind, spacing, n, steps_offset, set_alpha_to_one):
    scheduler = ddim_scheduler(
        prediction_type=DIFFUSERS_KIND[kind],
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=set_alpha_to_one,
    )
    schedule = vp_from(scheduler)
    x = initial_noise(1)
    theirs = diffusers_ddim_loop(scheduler, x, n)
    plan = ddim_plan(schedule, n, spacing, steps_offset, set_alpha_to_one)
    ours = np.asarray(run_sampler(make_denoise(schedule, kind), jnp.asarray(x), plan))
    assert ours.dtype == np.float32 and ours.shape == SHAPE
    # Both loops run in float32 on the same table; jdistill takes next-step coefficients from float64 square
    # roots (diffusers: float32) and orders the arithmetic differently. Samples reach |x| ~ 3 (ulp 2.4e-7) and
    # the rounding differences accumulate over the steps to 1.3e-6 after 50 steps (5 ulps), hence 1e-6
    # absolute plus 1e-6 relative.
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("eta", "spacing", "n"), [(1.0, "leading", 4), (0.5, "trailing", 10)])
def test_ddim_eta_matches_diffusers_with_the_same_noise(eta, spacing, n):
    scheduler = ddim_scheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    schedule = vp_from(scheduler)
    x = initial_noise(2)
    key = jax.random.key(7)
    noises = step_noises(key, n)
    theirs = diffusers_ddim_loop(scheduler, x, n, eta=eta, noises=noises)
    plan = ddim_plan(schedule, n, spacing, scheduler.config.steps_offset)
    ours = np.asarray(run_sampler(make_denoise(schedule, "eps"), jnp.asarray(x), plan, eta=eta, key=key))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)  # as for eta = 0
    # The noise matters: the deterministic run differs by O(1).
    deterministic = np.asarray(run_sampler(make_denoise(schedule, "eps"), jnp.asarray(x), plan))
    assert np.abs(ours - deterministic).max() > 0.1


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_one_step_trailing_ddim_returns_the_models_x0(set_alpha_to_one):
    scheduler = ddim_scheduler()
    schedule = vp_from(scheduler)
    x = initial_noise(3)
    plan = ddim_plan(schedule, 1, "trailing", set_alpha_to_one=set_alpha_to_one)
    np.testing.assert_array_equal(plan.timesteps, [999])
    x0_model = lambda x_t, t: 0.5 * x_t + 0.25  # noqa: E731
    ours = np.asarray(run_sampler(make_denoise(schedule, "x0", x0_model), jnp.asarray(x), plan))
    if set_alpha_to_one:
        # alpha_prev = 1, sigma_prev = 0: exactly the model's x0, bit for bit.
        np.testing.assert_array_equal(ours, np.asarray(x0_model(jnp.asarray(x), None)))
    else:
        # Lands on t = 0 instead: sqrt(abar_0) x0 + sqrt(1 - abar_0) eps.
        abar = scheduler.alphas_cumprod.numpy().astype(np.float64)
        x0 = 0.5 * x.astype(np.float64) + 0.25
        eps = (x - np.sqrt(abar[999]) * x0) / np.sqrt(1 - abar[999])
        expected = np.sqrt(abar[0]) * x0 + np.sqrt(1 - abar[0]) * eps
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    # With an eps model, the one-step result is x0 = (x - sigma eps) / alpha at t = 999 (float64 reference).
    if set_alpha_to_one:
        abar = scheduler.alphas_cumprod.numpy().astype(np.float64)[999]
        eps = np.asarray(torch_model(torch.from_numpy(x), 999).numpy(), np.float64)
        expected = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        got = np.asarray(run_sampler(make_denoise(schedule, "eps"), jnp.asarray(x), plan))
        # float32 against float64: x - sigma eps cancels (eps ~ x at t = 999), so its float32 rounding, two
        # ulps of |x| < 4 (2 * 2^-22), is divided by alpha = 0.068: 7e-6.
        assert np.abs(x).max() < 4
        np.testing.assert_allclose(got, expected, rtol=0, atol=2 * 2**-22 / np.sqrt(abar))


# --------------------------------------------------------------------------------------------------------------
# Flow Euler
# --------------------------------------------------------------------------------------------------------------


def flow_scheduler(shift, mu=None, **kwargs):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=mu is not None, **kwargs)
    return scheduler


FLOW_CASES = [(1.0, None, 4), (3.0, None, 4), (3.0, None, 28), (1.0, 0.8, 6), (1.0, flux_mu(4096), 10)]


@pytest.mark.parametrize(("shift", "mu", "n"), FLOW_CASES)
def test_flow_sigmas_match_diffusers(shift, mu, n):
    scheduler = flow_scheduler(shift, mu)
    scheduler.set_timesteps(n, mu=mu)
    ours = flow_sigmas(n, shift, 1000, mu)
    theirs = scheduler.sigmas.numpy().astype(np.float64)
    assert theirs[-1] == 0.0
    # diffusers rounds its end points and results to float32.
    np.testing.assert_allclose(ours, theirs[:-1], rtol=0, atol=1e-6)
    plan = flow_euler_plan(FlowSchedule(shift=shift), n, mu=mu)
    np.testing.assert_allclose(plan.timesteps * 1000, scheduler.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(plan.next_sigma, theirs[1:], rtol=0, atol=1e-6)
    np.testing.assert_allclose(plan.next_alpha, 1 - theirs[1:], rtol=0, atol=1e-6)
    assert plan.next_sigma[-1] == 0.0 and plan.next_alpha[-1] == 1.0
    assert plan.ddim_std_ratio is None


def test_flow_sigmas_closed_form():
    # shift 1: linspace(1, 1/1000, n), shifted once more for static shifts.
    np.testing.assert_allclose(flow_sigmas(4), np.linspace(1.0, 0.001, 4), rtol=1e-15)
    lo = 3 * 0.001 / (1 + 2 * 0.001)
    base = np.linspace(1.0, lo, 5)
    np.testing.assert_allclose(flow_sigmas(5, 3.0), 3 * base / (1 + 2 * base), rtol=1e-14)
    base = np.linspace(1.0, 0.001, 5)
    np.testing.assert_allclose(
        flow_sigmas(5, 3.0, mu=0.7), np.exp(0.7) / (np.exp(0.7) + 1 / base - 1), rtol=1e-14
    )
    # The schedule's own shift is the default of flow_euler_plan.
    np.testing.assert_array_equal(flow_euler_plan(FlowSchedule(shift=3.0), 5).timesteps, flow_sigmas(5, 3.0))


def velocity_torch(x, timestep):
    s = torch.as_tensor(timestep, dtype=torch.float32) / 1000
    return 0.4 * x * torch.cos(3 * s) - 0.3 * torch.sin(2 * s) + 0.2 * s


def velocity_jax(x, model_time):
    s = model_time.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)) / 1000
    return 0.4 * x * jnp.cos(3 * s) - 0.3 * jnp.sin(2 * s) + 0.2 * s


@pytest.mark.parametrize(("shift", "mu", "n"), [(1.0, None, 4), (3.0, None, 10), (1.0, 0.8, 6)])
def test_flow_euler_loop_matches_diffusers(shift, mu, n):
    scheduler = flow_scheduler(shift, mu)
    scheduler.set_timesteps(n, mu=mu)
    x = initial_noise(4)
    sample = torch.from_numpy(x)
    for t in scheduler.timesteps:
        sample = scheduler.step(velocity_torch(sample, t), t, sample).prev_sample
    theirs = sample.numpy()
    schedule = FlowSchedule(shift=shift)
    plan = flow_euler_plan(schedule, n, mu=mu)
    ours = np.asarray(run_sampler(make_denoise(schedule, "velocity", velocity_jax), jnp.asarray(x), plan))
    # Euler x + (s' - s) u in float32 on both sides; jdistill forms it as (1 - s') x0 + s' eps (same
    # arithmetic up to a few ulps of values ~ 3) and its sigmas may differ from diffusers' in the last bit.
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shift", "n"), [(1.0, 4), (3.0, 6)])
def test_stochastic_flow_sampler_matches_diffusers(monkeypatch, shift, n):
    key = jax.random.key(11)
    calls = feed_step_noises(monkeypatch, "diffusers.schedulers.scheduling_flow_match_euler_discrete", key, n)
    scheduler = flow_scheduler(shift, stochastic_sampling=True)
    scheduler.set_timesteps(n)
    x = initial_noise(5)
    sample = torch.from_numpy(x)
    for t in scheduler.timesteps:
        sample = scheduler.step(velocity_torch(sample, t), t, sample).prev_sample
    theirs = sample.numpy()
    assert len(calls) == n
    schedule = FlowSchedule(shift=shift)
    plan = flow_euler_plan(schedule, n)
    denoise = make_denoise(schedule, "velocity", velocity_jax)
    ours = np.asarray(run_sampler(denoise, jnp.asarray(x), plan, renoise=True, key=key))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    # Without re-noising, the deterministic Euler result is different.
    assert np.abs(ours - np.asarray(run_sampler(denoise, jnp.asarray(x), plan))).max() > 0.1


# --------------------------------------------------------------------------------------------------------------
# Few-step student sampler
# --------------------------------------------------------------------------------------------------------------

STUDENT_TIMESTEPS = (999, 749, 499, 249)


def numpy_student_loop(abar, x, timesteps, noises):
    """Predict x0 with the eps model, re-noise it with fresh noise to the next timestep; return the last x0."""
    x = x.astype(np.float64)
    for i, t in enumerate(timesteps):
        eps = torch_model(torch.from_numpy(x), t).numpy()  # float64 in, float64 out
        x0 = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
        if i == len(timesteps) - 1:
            return x0
        nxt = timesteps[i + 1]
        x = np.sqrt(abar[nxt]) * x0 + np.sqrt(1 - abar[nxt]) * noises[i]
    raise AssertionError("unreachable")


@pytest.mark.parametrize("timesteps", [STUDENT_TIMESTEPS, (999,), (999, 500)])
def test_student_sampler_matches_numpy_loop(timesteps):
    scheduler = ddim_scheduler()
    schedule = vp_from(scheduler)
    abar = scheduler.alphas_cumprod.numpy().astype(np.float64)
    key = jax.random.key(3)
    x = initial_noise(6)
    plan = student_plan(schedule, timesteps)
    np.testing.assert_array_equal(plan.timesteps, timesteps)
    assert plan.next_alpha[-1] == 1.0 and plan.next_sigma[-1] == 0.0
    ours = np.asarray(run_sampler(make_denoise(schedule, "eps"), jnp.asarray(x), plan, renoise=True, key=key))
    noises = [n.astype(np.float64) for n in step_noises(key, len(timesteps))]
    expected = numpy_student_loop(abar, x, timesteps, noises)
    # float32 against float64: a few ulps of values up to ~3; each x0 divides by alpha (1 / alpha = 14.6 at
    # t = 999, 1.9 at t = 249), but there the model's eps ~ x makes x - sigma eps small.
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_student_sampler_matches_diffusers_lcm(monkeypatch):
    """LCMScheduler with custom timesteps and a huge timestep_scaling (c_skip ~ 0, c_out ~ 1) is the same sampler."""
    key = jax.random.key(5)
    n = len(STUDENT_TIMESTEPS)
    calls = feed_step_noises(monkeypatch, "diffusers.schedulers.scheduling_lcm", key, n)
    scheduler = LCMScheduler(timestep_scaling=1e10)
    scheduler.set_timesteps(timesteps=list(STUDENT_TIMESTEPS))
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(249))
    assert float(c_skip) < 1e-20 and float(c_out) == pytest.approx(1.0, abs=1e-7)
    x = initial_noise(7)
    sample = torch.from_numpy(x)
    for t in scheduler.timesteps:
        sample, denoised = scheduler.step(torch_model(sample, t), t, sample, return_dict=False)
    theirs = denoised.numpy()
    # The last step does not re-noise (n - 1 draws), and the noise of step i feeds step i + 1.
    assert len(calls) == n - 1
    schedule = vp_from(scheduler)
    plan = student_plan(schedule, STUDENT_TIMESTEPS)
    ours = np.asarray(run_sampler(make_denoise(schedule, "eps"), jnp.asarray(x), plan, renoise=True, key=key))
    # Same float32 arithmetic up to the order of operations.
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_student_plan_on_continuous_schedules():
    plan = student_plan(FlowSchedule(), (1.0, 0.75, 0.5))
    np.testing.assert_allclose(plan.next_alpha, [0.25, 0.5, 1.0], rtol=1e-7)
    np.testing.assert_allclose(plan.next_sigma, [0.75, 0.5, 0.0], rtol=1e-7)
    plan = student_plan(TrigFlowSchedule(0.5), (1.5, 1.0))
    np.testing.assert_allclose(plan.next_alpha, [np.cos(1.0), 1.0], rtol=1e-6)
    np.testing.assert_allclose(plan.next_sigma, [0.5 * np.sin(1.0), 0.0], rtol=1e-6)


def test_deterministic_student_plan_is_ddim_between_its_timesteps():
    """Without re-noising the student plan moves along the predicted eps (DDIM on a custom timestep list)."""
    scheduler = ddim_scheduler()
    schedule = vp_from(scheduler)
    abar = scheduler.alphas_cumprod.numpy().astype(np.float64)
    x = initial_noise(8)
    ours = np.asarray(
        run_sampler(make_denoise(schedule, "eps"), jnp.asarray(x), student_plan(schedule, (999, 499)))
    )
    x64 = x.astype(np.float64)
    eps = torch_model(torch.from_numpy(x64), 999).numpy()
    x0 = (x64 - np.sqrt(1 - abar[999]) * eps) / np.sqrt(abar[999])
    x64 = np.sqrt(abar[499]) * x0 + np.sqrt(1 - abar[499]) * eps
    eps = torch_model(torch.from_numpy(x64), 499).numpy()
    expected = (x64 - np.sqrt(1 - abar[499]) * eps) / np.sqrt(abar[499])
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def test_student_plan_validation():
    schedule = VPSchedule.from_betas()
    with pytest.raises(ValueError, match="student timesteps must decrease strictly"):
        student_plan(schedule, (999, 999, 499))
    with pytest.raises(ValueError, match="student timesteps must decrease strictly"):
        student_plan(schedule, (249, 499))
    with pytest.raises(ValueError, match="non-empty 1-D list"):
        student_plan(schedule, ())
    with pytest.raises(ValueError, match="non-empty 1-D list"):
        student_plan(schedule, [[999, 499]])


def test_run_sampler_validation():
    schedule = VPSchedule.from_betas()
    x = jnp.zeros((1, 2))
    denoise = make_denoise(schedule, "eps")
    with pytest.raises(ValueError, match="a PRNG key is needed"):
        run_sampler(denoise, x, ddim_plan(schedule, 2), eta=0.5)
    with pytest.raises(ValueError, match="a PRNG key is needed"):
        run_sampler(denoise, x, student_plan(schedule, (999, 499)), renoise=True)
    flow_plan = flow_euler_plan(FlowSchedule(), 2)
    with pytest.raises(ValueError, match="eta > 0 is only defined for DDIM plans"):
        run_sampler(make_denoise(FlowSchedule(), "velocity"), x, flow_plan, eta=0.5, key=jax.random.key(0))


def test_sampler_plan_len():
    plan = SamplerPlan(np.array([3, 2, 1]), np.ones(3), np.zeros(3))
    assert len(plan) == 3 and plan.ddim_std_ratio is None
