"""Noise schedules against diffusers' schedulers, closed forms and finite differences.

References are never jdistill's own output: diffusers (torch CPU, float32), float64 numpy closed forms, or
central finite differences of float64 closed forms.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from jdistill.diffusion.parameterization import Prediction
from jdistill.diffusion.schedules import (
    FlowSchedule,
    Schedule,
    TrigFlowSchedule,
    VPSchedule,
    flux_mu,
    make_betas,
    shift_sigmas,
    time_shift_exponential,
)

BETAS = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}


def reference_alphas_cumprod(kind):
    """float64 closed form of DDPM's alphas_cumprod (betas as in diffusers, without its float32 rounding)."""
    start, end = BETAS[kind]
    if kind == "linear":
        betas = np.linspace(start, end, 1000, dtype=np.float64)
    else:
        betas = np.linspace(math.sqrt(start), math.sqrt(end), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def ddpm(kind):
    start, end = BETAS[kind]
    return DDPMScheduler(beta_schedule=kind, beta_start=start, beta_end=end, num_train_timesteps=1000)


def rand(shape, seed):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# VPSchedule: the table
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_from_betas_matches_diffusers(kind):
    start, end = BETAS[kind]
    schedule = VPSchedule.from_betas(kind, start, end, 1000)
    assert schedule.num_train_timesteps == 1000
    assert schedule.t_min == 0.0 and schedule.t_max == 999.0
    ours = np.asarray(schedule.alphas_cumprod)
    assert ours.shape == (1000,)
    # Against the float64 closed form: jdistill computes in float64, so this holds to rounding.
    np.testing.assert_allclose(ours, reference_alphas_cumprod(kind), rtol=1e-12, atol=0)
    # Against diffusers: its betas and the 1000-term cumprod are float32, whose accumulated rounding reaches
    # 9.3e-7 relative at the end of the scaled_linear table; 1e-6 relative is the tightest honest bound.
    theirs = ddpm(kind).alphas_cumprod.numpy().astype(np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


def test_scaled_linear_spot_values():
    abar = np.asarray(VPSchedule.from_betas("scaled_linear", 0.00085, 0.012).alphas_cumprod)
    assert abar[0] == pytest.approx(1.0 - 0.00085, abs=1e-15)
    # The Stable Diffusion value quoted to five significant digits.
    assert abar[999] == pytest.approx(0.0046601, abs=5e-8)
    assert np.all(np.diff(abar) < 0)


def test_make_betas_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown beta schedule 'cosine'"):
        make_betas("cosine", 0.1, 0.2, 10)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_vp_add_noise_integer_timesteps_matches_ddpm(kind):
    start, end = BETAS[kind]
    schedule = VPSchedule.from_betas(kind, start, end)
    t = np.array([0, 1, 37, 500, 998, 999])
    x0, eps = rand((6, 2, 3, 3), 0), rand((6, 2, 3, 3), 1)
    ours = np.asarray(schedule.add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)))
    assert ours.dtype == np.float32
    theirs = ddpm(kind).add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    abar = reference_alphas_cumprod(kind)[t][:, None, None, None]
    # Both take sqrt of a float32 alphas_cumprod. Near t = 0, abar is within 1e-3 of 1 and one float32 ulp
    # of it (2^-24 below 1; diffusers' float32 cumprod can be a few ulps off) moves sigma = sqrt(1 - abar)
    # by ulp / (2 sigma), e.g. 2e-6 at t = 1 of the linear schedule: the bound is 1e-6 plus two ulps
    # propagated through the sqrt, times |eps| <= 1.
    tol = 1e-6 + 2 * 2**-24 / (2 * np.sqrt(1 - abar))
    assert np.all(np.abs(ours - theirs) <= tol), np.max(np.abs(ours - theirs) / tol)
    # float64 closed form on the same inputs: only jdistill's own float32 rounding of abar enters.
    expected = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    assert np.all(np.abs(ours - expected) <= tol), np.max(np.abs(ours - expected) / tol)


def test_vp_add_noise_returns_the_input_dtype():
    schedule = VPSchedule.from_betas()
    x0 = jnp.asarray(rand((2, 4), 2), jnp.bfloat16)
    eps = jnp.asarray(rand((2, 4), 3), jnp.bfloat16)
    t = jnp.array([10, 900])
    out = schedule.add_noise(x0, eps, t)
    assert out.dtype == jnp.bfloat16
    abar = reference_alphas_cumprod("scaled_linear")[np.array([10, 900])][:, None]
    expected = np.sqrt(abar) * np.asarray(x0, np.float64) + np.sqrt(1 - abar) * np.asarray(eps, np.float64)
    # Within one bfloat16 rounding (unit roundoff 2^-8) of the exact value.
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_prediction_v_matches_diffusers_get_velocity(kind):
    start, end = BETAS[kind]
    schedule = VPSchedule.from_betas(kind, start, end)
    t = np.array([3, 250, 999])
    x0, eps = rand((3, 4, 2), 4), rand((3, 4, 2), 5)
    alpha, sigma = schedule.alpha_sigma(jnp.asarray(t))
    zero = jnp.zeros_like(alpha[:, None, None])
    pred = Prediction(
        x0=jnp.asarray(x0),
        eps=jnp.asarray(eps),
        alpha=alpha[:, None, None],
        sigma=sigma[:, None, None],
        dalpha=zero,
        dsigma=zero,
    )
    theirs = ddpm(kind).get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    # Same float32-table argument as for add_noise.
    abar = reference_alphas_cumprod(kind)[t][:, None, None]
    tol = 1e-6 + 2 * 2**-24 / (2 * np.sqrt(1 - abar))
    assert np.all(np.abs(np.asarray(pred.v) - theirs) <= tol)
    expected = np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0
    assert np.all(np.abs(np.asarray(pred.v) - expected) <= tol)


# --------------------------------------------------------------------------------------------------------------
# VPSchedule: continuous time
# --------------------------------------------------------------------------------------------------------------

# Float timesteps exactly representable in float32, so frac is exact.
FLOAT_T = np.array([0.25, 1.5, 250.75, 500.5, 998.125, 998.875], np.float32)


def test_vp_float_timesteps_interpolate_linearly():
    schedule = VPSchedule.from_betas()
    table32 = np.asarray(schedule.alphas_cumprod, np.float32).astype(np.float64)
    ours = np.asarray(schedule.alphas_cumprod_at(jnp.asarray(FLOAT_T)), np.float64)
    lo = np.floor(FLOAT_T).astype(int)
    frac = FLOAT_T.astype(np.float64) - lo
    expected = (1 - frac) * table32[lo] + frac * table32[lo + 1]
    # A few float32 roundings (2^-24 = 6e-8 relative each) in the interpolation.
    np.testing.assert_allclose(ours, expected, rtol=2e-7, atol=0)
    # np.interp on the float64 table; the float32 rounding of the table entries adds 6e-8 relative.
    ref = reference_alphas_cumprod("scaled_linear")
    np.testing.assert_allclose(ours, np.interp(FLOAT_T.astype(np.float64), np.arange(1000), ref), rtol=3e-7)
    # Strictly between the neighbouring table entries.
    assert np.all((ours < table32[lo]) & (ours > table32[lo + 1]))


def test_vp_integer_valued_float_timesteps_equal_table_entries():
    schedule = VPSchedule.from_betas()
    ints = np.array([0, 1, 500, 998, 999])
    as_float = np.asarray(schedule.alphas_cumprod_at(jnp.asarray(ints, jnp.float32)))
    as_int = np.asarray(schedule.alphas_cumprod_at(jnp.asarray(ints)))
    np.testing.assert_array_equal(as_float, np.float32(reference_alphas_cumprod("scaled_linear")[ints]))
    np.testing.assert_array_equal(as_int, np.float32(reference_alphas_cumprod("scaled_linear")[ints]))
    alpha, sigma = schedule.alpha_sigma(jnp.asarray(ints))
    np.testing.assert_allclose(np.asarray(alpha) ** 2 + np.asarray(sigma) ** 2, 1.0, atol=3e-7)


def vp_reference(t, table):
    """float64 (alpha, sigma, dalpha, dsigma) of the linearly interpolated table, right-sided at the knots."""
    t = np.asarray(t, np.float64)
    lo = np.minimum(np.floor(t).astype(int), len(table) - 2)
    abar = np.interp(t, np.arange(len(table)), table)
    dabar = table[lo + 1] - table[lo]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    return alpha, sigma, dabar / (2 * alpha), -dabar / (2 * sigma)


def test_vp_derivatives_match_closed_form_and_finite_differences():
    schedule = VPSchedule.from_betas()
    # The float32 table is what jdistill interpolates; the slopes are differences of neighbouring float32
    # entries (exact in float32 by Sterbenz), so the reference uses the same rounded table in float64.
    table = np.asarray(schedule.alphas_cumprod, np.float32).astype(np.float64)
    dalpha, dsigma = (np.asarray(d, np.float64) for d in schedule.derivatives(jnp.asarray(FLOAT_T)))
    _, sigma, ref_da, ref_ds = vp_reference(FLOAT_T, table)
    # dsigma = -dabar / (2 sigma): jdistill interpolates abar in float32 (error ~2^-24), which moves
    # sigma = sqrt(1 - abar) by 2^-24 / (2 sigma^2) relative; that dominates near t = 0 (7e-6 at t = 0.25).
    rtol_sigma = 1e-6 + 2 * 2**-24 / (2 * sigma**2)
    np.testing.assert_allclose(dalpha, ref_da, rtol=1e-6)
    assert np.all(np.abs(dsigma - ref_ds) <= rtol_sigma * np.abs(ref_ds))
    # Central finite differences of the float64 closed form sqrt(interp(t)) inside each segment.
    h = 1e-4
    t64 = FLOAT_T.astype(np.float64)
    a_plus, s_plus, _, _ = vp_reference(t64 + h, table)
    a_minus, s_minus, _, _ = vp_reference(t64 - h, table)
    np.testing.assert_allclose(dalpha, (a_plus - a_minus) / (2 * h), rtol=1e-6)
    fd_sigma = (s_plus - s_minus) / (2 * h)
    assert np.all(np.abs(dsigma - fd_sigma) <= rtol_sigma * np.abs(fd_sigma))
    # Integer timesteps are differentiated on the interpolated table as well (right-sided at interior knots).
    ints = np.array([1, 500, 998])
    dalpha_i, dsigma_i = (np.asarray(d, np.float64) for d in schedule.derivatives(jnp.asarray(ints)))
    _, sigma_i, ref_da_i, ref_ds_i = vp_reference(ints, table)
    np.testing.assert_allclose(dalpha_i, ref_da_i, rtol=1e-6)
    rtol_i = 1e-6 + 2 * 2**-24 / (2 * sigma_i**2)
    assert np.all(np.abs(dsigma_i - ref_ds_i) <= rtol_i * np.abs(ref_ds_i))


@pytest.mark.parametrize("end", [0.0, 999.0], ids=["t_min_first_segment", "t_max_last_segment"])
def test_vp_derivative_at_an_end_is_that_segments_slope(end):
    schedule = VPSchedule.from_betas()
    table = np.asarray(schedule.alphas_cumprod, np.float32).astype(np.float64)
    dalpha, dsigma = (np.asarray(d, np.float64) for d in schedule.derivatives(jnp.asarray([end, end])))
    _, _, ref_da, ref_ds = vp_reference(np.array([end, end]), table)
    np.testing.assert_allclose(dalpha, ref_da, rtol=1e-6)
    np.testing.assert_allclose(dsigma, ref_ds, rtol=1e-6)


def test_vp_model_time_is_the_timestep():
    schedule = VPSchedule.from_betas()
    out = schedule.model_time(jnp.asarray([0, 17, 999]))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), [0.0, 17.0, 999.0])


# --------------------------------------------------------------------------------------------------------------
# Flow and TrigFlow
# --------------------------------------------------------------------------------------------------------------

CONT_T = np.array([0.0, 0.125, 0.4, 0.75, 1.0], np.float32)


def central_difference(f, t, h):
    """Central differences of a float64 numpy function."""
    t = np.asarray(t, np.float64)
    return tuple((p - m) / (2 * h) for p, m in zip(f(t + h), f(t - h), strict=True))


def test_flow_alpha_sigma_and_derivatives():
    schedule = FlowSchedule()
    alpha, sigma = schedule.alpha_sigma(jnp.asarray(CONT_T))
    np.testing.assert_array_equal(np.asarray(alpha), 1.0 - CONT_T)
    np.testing.assert_array_equal(np.asarray(sigma), CONT_T)
    dalpha, dsigma = schedule.derivatives(jnp.asarray(CONT_T))
    fd_alpha, fd_sigma = central_difference(lambda t: (1.0 - t, t), CONT_T, 1e-3)
    np.testing.assert_allclose(np.asarray(dalpha), fd_alpha, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(dsigma), fd_sigma, rtol=1e-9)
    np.testing.assert_array_equal(np.asarray(dalpha), -np.ones(5))
    np.testing.assert_array_equal(np.asarray(dsigma), np.ones(5))
    # The closed-form override agrees with forward-mode differentiation of alpha_sigma.
    jvp_alpha, jvp_sigma = Schedule.derivatives(schedule, jnp.asarray(CONT_T))
    np.testing.assert_array_equal(np.asarray(jvp_alpha), np.asarray(dalpha))
    np.testing.assert_array_equal(np.asarray(jvp_sigma), np.asarray(dsigma))


@pytest.mark.parametrize("num_train_timesteps", [1000, 500])
def test_flow_model_time(num_train_timesteps):
    schedule = FlowSchedule(num_train_timesteps=num_train_timesteps)
    out = schedule.model_time(jnp.asarray([0.0, 0.25, 0.5, 1.0]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), num_train_timesteps * np.array([0.0, 0.25, 0.5, 1.0]), rtol=1e-7
    )
    assert schedule.t_min == 0.0 and schedule.t_max == 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_add_noise_matches_scale_noise(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps[torch.tensor([0, 3, 6, 9])]
    x0, eps = rand((4, 3, 2, 2), 6), rand((4, 3, 2, 2), 7)
    theirs = scheduler.scale_noise(torch.from_numpy(x0), timesteps, torch.from_numpy(eps)).numpy()
    t = timesteps.numpy().astype(np.float64) / 1000
    ours = np.asarray(FlowSchedule(shift=shift).add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)))
    # diffusers' sigma and timestep / 1000 may differ in the last float32 bit: 1e-6 covers |x0|, |eps| <= 1.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    expected = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_trigflow_alpha_sigma_and_derivatives(sigma_data):
    schedule = TrigFlowSchedule(sigma_data=sigma_data)
    t = np.array([0.0, 0.3, 0.8, 1.2, math.pi / 2], np.float32)
    t64 = t.astype(np.float64)
    alpha, sigma = schedule.alpha_sigma(jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(alpha), np.cos(t64), atol=2e-7)
    np.testing.assert_allclose(np.asarray(sigma), sigma_data * np.sin(t64), atol=2e-7)
    dalpha, dsigma = schedule.derivatives(jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(dalpha), -np.sin(t64), atol=2e-7)
    np.testing.assert_allclose(np.asarray(dsigma), sigma_data * np.cos(t64), atol=2e-7)
    fd_alpha, fd_sigma = central_difference(lambda s: (np.cos(s), sigma_data * np.sin(s)), t, 1e-5)
    np.testing.assert_allclose(np.asarray(dalpha), fd_alpha, atol=2e-7)
    np.testing.assert_allclose(np.asarray(dsigma), fd_sigma, atol=2e-7)
    jvp_alpha, jvp_sigma = Schedule.derivatives(schedule, jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(jvp_alpha), np.asarray(dalpha), atol=1e-7)
    np.testing.assert_allclose(np.asarray(jvp_sigma), np.asarray(dsigma), atol=1e-7)
    assert schedule.t_max == pytest.approx(math.pi / 2)
    np.testing.assert_array_equal(np.asarray(schedule.model_time(jnp.asarray(t))), t)


@pytest.mark.parametrize(
    ("schedule", "std"), [(FlowSchedule(), 1.0), (TrigFlowSchedule(sigma_data=0.5), 0.5)]
)
def test_prior_sample_scale(schedule, std):
    raw = schedule.prior_sample(jax.random.key(0), (200_000,))
    assert raw.dtype == jnp.float32 and raw.shape == (200_000,)
    x = np.asarray(raw, np.float64)
    # Standard error of the sample std is std / sqrt(2 n) = 0.0016 std; 1% is > 6 standard errors.
    assert x.std() == pytest.approx(std, rel=0.01)
    assert abs(x.mean()) < 0.01 * std


# --------------------------------------------------------------------------------------------------------------
# Timestep shifts
# --------------------------------------------------------------------------------------------------------------


def test_shift_sigmas_closed_form():
    s = np.array([0.0, 0.001, 0.25, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s), rtol=1e-15)
    assert shift_sigmas(0.5, 3.0) == pytest.approx(0.75, abs=1e-15)
    np.testing.assert_array_equal(shift_sigmas(s, 1.0), s)
    out = shift_sigmas(jnp.asarray(s, jnp.float32), 3.0)
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(np.asarray(out), 3 * s / (1 + 2 * s), atol=1e-7)


@pytest.mark.parametrize("shift", [1.0, 3.0, 1.15])
def test_shift_sigmas_matches_diffusers_training_sigmas(shift):
    # FlowMatchEulerDiscreteScheduler shifts its training sigmas t / 1000 in __init__ (float32 torch).
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift).sigmas.numpy().astype(np.float64)
    train = np.arange(1000, 0, -1, dtype=np.float64) / 1000
    np.testing.assert_allclose(shift_sigmas(train, shift), theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.15, -0.3])
def test_time_shift_exponential(mu):
    s = np.array([0.001, 0.1, 0.5, 0.8, 1.0])
    expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    np.testing.assert_allclose(time_shift_exponential(s, mu), expected, rtol=1e-14)
    # It is the static shift with shift = exp(mu): e^mu s / (1 + (e^mu - 1) s).
    np.testing.assert_allclose(time_shift_exponential(s, mu), shift_sigmas(s, math.exp(mu)), rtol=1e-14)
    theirs = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)._time_shift_exponential(mu, 1.0, s)
    np.testing.assert_allclose(time_shift_exponential(s, mu), theirs, rtol=1e-14)
    # power
    np.testing.assert_allclose(
        time_shift_exponential(s, mu, 2.0), math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 2), rtol=1e-14
    )
    assert time_shift_exponential(np.array([0.5]), 0.0)[0] == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 4500, 64])
def test_flux_mu_matches_calculate_shift(seq_len):
    slope = (1.15 - 0.5) / (4096 - 256)
    assert flux_mu(seq_len) == pytest.approx(0.5 + slope * (seq_len - 256), abs=1e-12)
    try:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    except ImportError:  # pragma: no cover - diffusers is a pinned test dependency
        return
    assert flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    assert flux_mu(seq_len, 128, 2048, 0.3, 1.2) == pytest.approx(
        calculate_shift(seq_len, 128, 2048, 0.3, 1.2), abs=1e-12
    )


def test_flux_mu_end_points():
    assert flux_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
