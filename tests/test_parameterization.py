"""Parameterization conversions and classifier-free guidance against hand-built float64 truths.

For every schedule and prediction type the truth (x0, eps) is drawn in numpy, x_t = alpha x0 + sigma eps is
built by hand from float64 closed-form coefficients, and the true network output of that type is converted
with ``to_prediction``; every other parameterization must then be recovered.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from tiny_configs import SD_BETAS

from jdistill.diffusion.guidance import (
    CFG_CONVENTIONS,
    cfg_combine,
    guide,
    guided_predict,
    is_identity,
    select_cond,
)
from jdistill.diffusion.parameterization import PREDICTION_TYPES, Prediction, from_x0, to_prediction
from jdistill.diffusion.schedules import FlowSchedule, TrigFlowSchedule, VPSchedule

VP = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000)
# jdistill stores the table in float32 (as diffusers does); the reference uses that rounded table in float64
# so the conversions, not the table rounding (tested in test_schedules.py), are what is measured here.
VP_TABLE = np.asarray(VP.alphas_cumprod, np.float32).astype(np.float64)


def vp_coefficients(t):
    """(alpha, sigma, dalpha, dsigma) of the linearly interpolated table, right-sided at interior knots."""
    t = np.asarray(t, np.float64)
    lo = np.minimum(np.floor(t).astype(int), 998)
    abar = np.interp(t, np.arange(1000), VP_TABLE)
    dabar = VP_TABLE[lo + 1] - VP_TABLE[lo]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    return alpha, sigma, dabar / (2 * alpha), -dabar / (2 * sigma)


def flow_coefficients(t):
    t = np.asarray(t, np.float64)
    return 1 - t, t, -np.ones_like(t), np.ones_like(t)


def trigflow_coefficients(sigma_data):
    def coefficients(t):
        t = np.asarray(t, np.float64)
        return np.cos(t), sigma_data * np.sin(t), -np.sin(t), sigma_data * np.cos(t)

    return coefficients


# (schedule, timesteps as given to jdistill, float64 coefficient function)
SCHEDULES = {
    "vp_int": (VP, np.array([1, 250, 500, 998], np.int32), vp_coefficients),
    "vp_float": (VP, np.array([0.5, 250.25, 600.75, 998.5], np.float32), vp_coefficients),
    "flow": (FlowSchedule(), np.array([0.05, 0.3, 0.7, 0.95], np.float32), flow_coefficients),
    "trigflow": (
        TrigFlowSchedule(0.5),
        np.array([0.1, 0.6, 1.0, 1.45], np.float32),
        trigflow_coefficients(0.5),
    ),
    "trigflow_sd1": (TrigFlowSchedule(1.0), np.array([0.2, 1.3], np.float32), trigflow_coefficients(1.0)),
}

SHAPE = (3, 2, 2)  # per-sample shape; the batch is the number of timesteps
U = 2.0**-24  # float32 unit roundoff


def make_case(name, x0, eps):
    """Float64 truth: coefficients (B, 1, 1, 1), x_t and the five parameterizations of (x0, eps)."""
    schedule, t, coefficients = SCHEDULES[name]
    a, s, da, ds = (c.reshape(-1, 1, 1, 1) for c in coefficients(t))
    return dict(
        name=name,
        schedule=schedule,
        t=t,
        coefs=(a, s, da, ds),
        x0=x0,
        eps=eps,
        x_t=a * x0 + s * eps,
        v=a * eps - s * x0,
        velocity=da * x0 + ds * eps,
        score=-eps / s,
    )


def truth(name, seed=0, x_t=None):
    """A random truth at the case's timesteps; with ``x_t`` given, a different (x0, eps) on the same x_t."""
    t = SCHEDULES[name][1]
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((len(t), *SHAPE))
    if x_t is None:
        return make_case(name, rng.standard_normal((len(t), *SHAPE)), eps)
    a, s, _, _ = (c.reshape(-1, 1, 1, 1) for c in SCHEDULES[name][2](t))
    return make_case(name, (x_t - s * eps) / a, eps)


def rows(coefs):
    """Each parameterization as the row (m, n) of m x0 + n eps."""
    a, s, da, ds = coefs
    return {"x0": (1.0, 0.0), "eps": (0.0, 1.0), "v": (-s, a), "velocity": (da, ds), "x_t": (a, s)}


def error_bounds(case, kind, factor=4.0):
    """First-order float32 error bounds (elementwise, absolute) for to_prediction(case[kind], kind, ...).

    Inverting x_t = a x0 + s eps, out = p x0 + q eps gives x0 = (q x_t - s out) / D and eps = (a out -
    p x_t) / D with D = a q - s p. Inputs and coefficients carry a relative error e, so x0 is off by about
    e ((|q| |x_t| + |s| |out|) / |D| + |x0|), likewise eps, and any other row m x0 + n eps by |m| dx0 + |n|
    deps + e (|m x0| + |n eps|). e = u for the inputs plus the coefficients' own error: u for Flow and
    TrigFlow; for VP, jdistill interpolates abar in float32 (rounding u abar), which moves sigma =
    sqrt(1 - abar) by u abar / (2 sigma^2) relative (2e-5 at t = 0.5). ``factor`` = 4 leaves a margin over
    the largest ratio observed (0.97).
    """
    a, s, _, _ = case["coefs"]
    r = rows(case["coefs"])
    p, q = r[kind]
    det = np.abs(a * q - s * p)
    x_t, out = np.abs(case["x_t"]), np.abs(case[kind])
    e = U + U * (1 + (a**2 / (2 * s**2) if case["name"].startswith("vp") else 0))
    bounds = {
        "x0": e * ((np.abs(q) * x_t + np.abs(s) * out) / det + np.abs(case["x0"])),
        "eps": e * ((np.abs(p) * x_t + np.abs(a) * out) / det + np.abs(case["eps"])),
    }
    for field in ("v", "velocity", "x_t"):
        m, n = r[field]
        bounds[field] = (
            np.abs(m) * bounds["x0"]
            + np.abs(n) * bounds["eps"]
            + e * (np.abs(m * case["x0"]) + np.abs(n * case["eps"]))
        )
    bounds["score"] = (bounds["eps"] + e * np.abs(case["eps"])) / s
    return {k: factor * b for k, b in bounds.items()}


def assert_close(actual, expected, tol, what):
    err = np.abs(np.asarray(actual, np.float64) - expected)
    assert np.all(err <= tol), f"{what}: max error {err.max():.3g}, max error / tol {np.max(err / tol):.3g}"


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_to_prediction_recovers_every_parameterization(name, kind):
    case = truth(name)
    schedule, t = case["schedule"], case["t"]
    output = jnp.asarray(case[kind], jnp.float32)
    x_t = jnp.asarray(case["x_t"], jnp.float32)
    pred = to_prediction(output, kind, x_t, schedule, jnp.asarray(t))
    assert isinstance(pred, Prediction)
    tol = error_bounds(case, kind)
    for field in ("x0", "eps", "v", "velocity", "x_t", "score"):
        assert_close(getattr(pred, field), case[field], tol[field], field)
        assert getattr(pred, field).dtype == jnp.float32
    for other in PREDICTION_TYPES:
        assert_close(pred.as_type(other), case[other], tol[other], f"as_type({other})")
    # The stored coefficients are the schedule's at t.
    for got, want in zip((pred.alpha, pred.sigma, pred.dalpha, pred.dsigma), case["coefs"], strict=True):
        assert_close(got, want, 1e-6 * np.maximum(1, np.abs(want)), "coefficient")


def test_to_prediction_upcasts_bfloat16_outputs():
    case = truth("vp_int")
    output = jnp.asarray(case["eps"], jnp.bfloat16)
    x_t = jnp.asarray(case["x_t"], jnp.bfloat16)
    pred = to_prediction(output, "eps", x_t, VP, jnp.asarray(case["t"]))
    assert pred.x0.dtype == jnp.float32 and pred.eps.dtype == jnp.float32
    # eps passes through exactly (the bfloat16 values, widened).
    np.testing.assert_array_equal(np.asarray(pred.eps), np.asarray(output, np.float32))


def test_from_x0_is_x0_prediction():
    case = truth("flow")
    x_t = jnp.asarray(case["x_t"], jnp.float32)
    pred = from_x0(jnp.asarray(case["x0"], jnp.float32), x_t, FlowSchedule(), jnp.asarray(case["t"]))
    tol = error_bounds(case, "x0")
    assert_close(pred.x0, case["x0"], tol["x0"], "x0")
    assert_close(pred.eps, case["eps"], tol["eps"], "eps")


def test_rectified_flow_special_cases():
    """x0 = x_t - t u and eps = x_t + (1 - t) u for u = eps - x0 (SD3 / FLUX velocity)."""
    case = truth("flow", seed=3)
    t = case["t"].astype(np.float64).reshape(-1, 1, 1, 1)
    u = case["eps"] - case["x0"]
    np.testing.assert_allclose(case["velocity"], u, atol=1e-12)  # the truth is the literature's velocity
    pred = to_prediction(
        jnp.asarray(u, jnp.float32),
        "velocity",
        jnp.asarray(case["x_t"], jnp.float32),
        FlowSchedule(),
        case["t"],
    )
    x_t = np.asarray(np.float32(case["x_t"]), np.float64)
    u32 = np.asarray(np.float32(u), np.float64)
    np.testing.assert_allclose(np.asarray(pred.x0), x_t - t * u32, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pred.eps), x_t + (1 - t) * u32, atol=1e-6)


@pytest.mark.parametrize("name", ["vp_int", "vp_float"])
def test_vp_v_prediction_matches_ddim_formulas(name):
    """On VP, alpha^2 + sigma^2 = 1: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v."""
    case = truth(name, seed=4)
    a, s = case["coefs"][:2]
    x_t = np.asarray(np.float32(case["x_t"]), np.float64)
    v = np.asarray(np.float32(case["v"]), np.float64)
    pred = to_prediction(jnp.asarray(v, jnp.float32), "v", jnp.asarray(x_t, jnp.float32), VP, case["t"])
    tol = error_bounds(case, "v")
    assert_close(pred.x0, a * x_t - s * v, tol["x0"], "x0")
    assert_close(pred.eps, s * x_t + a * v, tol["eps"], "eps")


def test_vp_conversions_match_diffusers_ddim_step():
    """DDIMScheduler.step's pred_original_sample for epsilon, v_prediction and sample outputs."""
    rng = np.random.default_rng(5)
    x_t = rng.standard_normal((1, 3, 2, 2)).astype(np.float32)
    out = rng.standard_normal((1, 3, 2, 2)).astype(np.float32)
    for diffusers_kind, kind in (("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")):
        scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, prediction_type=diffusers_kind)
        # Feed jdistill the same float32 table so only the conversion is compared.
        schedule = VPSchedule(alphas_cumprod=scheduler.alphas_cumprod.numpy().astype(np.float64))
        scheduler.set_timesteps(4)
        for t in scheduler.timesteps:
            step = scheduler.step(torch.from_numpy(out), t, torch.from_numpy(x_t))
            pred = to_prediction(jnp.asarray(out), kind, jnp.asarray(x_t), schedule, jnp.asarray([int(t)]))
            # Same float32 table and formulas in a different order; x0 at t = 750 (alpha = 0.237) reaches ~10,
            # so 1e-6 relative (8 ulps) plus 1e-6 absolute.
            np.testing.assert_allclose(
                np.asarray(pred.x0), step.pred_original_sample.numpy(), rtol=1e-6, atol=1e-6, err_msg=kind
            )


@pytest.mark.parametrize("t", [0, 999])
def test_vp_velocity_round_trip_at_table_ends(t):
    # Right-sided slope at t = 0 (as at every interior knot), the only (left-sided) one at t = 999.
    slope = VP_TABLE[1] - VP_TABLE[0] if t == 0 else VP_TABLE[999] - VP_TABLE[998]
    a, s = math.sqrt(VP_TABLE[t]), math.sqrt(1 - VP_TABLE[t])
    coefs = tuple(np.full((1, 1, 1, 1), c) for c in (a, s, slope / (2 * a), -slope / (2 * s)))
    rng = np.random.default_rng(6)
    x0, eps = rng.standard_normal((1, *SHAPE)), rng.standard_normal((1, *SHAPE))
    case = dict(name="vp_int", coefs=coefs, x0=x0, eps=eps, x_t=a * x0 + s * eps, score=-eps / s)
    case["velocity"] = coefs[2] * x0 + coefs[3] * eps
    case["v"] = a * eps - s * x0
    pred = to_prediction(
        jnp.asarray(case["velocity"], jnp.float32),
        "velocity",
        jnp.asarray(case["x_t"], jnp.float32),
        VP,
        jnp.asarray([t]),
    )
    tol = error_bounds(case, "velocity")
    for field in ("x0", "eps", "velocity"):
        assert_close(getattr(pred, field), case[field], tol[field], field)
    # A correct eps prediction must also report the true velocity.
    from_eps = to_prediction(
        jnp.asarray(eps, jnp.float32), "eps", jnp.asarray(case["x_t"], jnp.float32), VP, t
    )
    assert_close(
        from_eps.velocity, case["velocity"], error_bounds(case, "eps")["velocity"], "velocity from eps"
    )


def test_unknown_prediction_type_is_rejected():
    x = jnp.ones((1, 2))
    with pytest.raises(ValueError, match="unknown prediction type 'epsilon'"):
        to_prediction(x, "epsilon", x, VP, jnp.asarray([10]))
    pred = to_prediction(x, "eps", x, VP, jnp.asarray([10]))
    with pytest.raises(ValueError, match="unknown prediction type 'score'"):
        pred.as_type("score")


def test_prediction_is_a_pytree():
    pred = to_prediction(jnp.ones((2, 3)), "eps", jnp.zeros((2, 3)), VP, jnp.asarray([5, 7]))
    leaves = jax.tree.leaves(pred)
    assert len(leaves) == 6
    doubled = jax.tree.map(lambda a: 2 * a, pred)
    np.testing.assert_array_equal(np.asarray(doubled.eps), 2 * np.ones((2, 3)))


# --------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------------------------


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def cfg_bound(c, u, w):
    """float32 rounding of y + w (c - u): a few ulps of |c| + |u| + |w| (|c| + |u|)."""
    return 4 * U * (1 + np.abs(w)) * (np.abs(c) + np.abs(u))


@pytest.mark.parametrize("scale", [0.0, 1.0, 4.5, -2.0])
def test_cfg_combine_formulas(scale):
    c, u = rand((2, 3, 4), 10), rand((2, 3, 4), 11)
    c64, u64 = c.astype(np.float64), u.astype(np.float64)
    out_u = cfg_combine(jnp.asarray(c), jnp.asarray(u), scale, "uncond")
    out_c = cfg_combine(jnp.asarray(c), jnp.asarray(u), scale, "cond")
    assert out_u.dtype == jnp.float32 and out_c.dtype == jnp.float32
    tol = cfg_bound(c64, u64, scale + 1)
    assert_close(out_u, u64 + scale * (c64 - u64), tol, "uncond")
    assert_close(out_c, c64 + scale * (c64 - u64), tol, "cond")
    # "cond" with w equals "uncond" with w + 1.
    out = cfg_combine(jnp.asarray(c), jnp.asarray(u), scale + 1.0, "uncond")
    assert_close(out, np.asarray(out_c, np.float64), 2 * tol, "cond(w) vs uncond(w + 1)")


def test_cfg_combine_per_sample_scale_and_bfloat16():
    c, u = rand((3, 2, 2), 12), rand((3, 2, 2), 13)
    c64, u64 = c.astype(np.float64), u.astype(np.float64)
    scale = np.array([1.0, 3.0, 7.5], np.float32)
    w = scale.astype(np.float64)[:, None, None]
    out = cfg_combine(jnp.asarray(c), jnp.asarray(u), jnp.asarray(scale), "uncond")
    assert_close(out, u64 + w * (c64 - u64), cfg_bound(c64, u64, w), "per-sample")
    for i, wi in enumerate(scale):
        single = cfg_combine(jnp.asarray(c[i : i + 1]), jnp.asarray(u[i : i + 1]), float(wi), "uncond")
        assert_close(
            out[i : i + 1], np.asarray(single, np.float64), 2 * cfg_bound(c64[i], u64[i], wi), "single"
        )
    cb, ub = jnp.asarray(c, jnp.bfloat16), jnp.asarray(u, jnp.bfloat16)
    out_b = cfg_combine(cb, ub, 2.0, "cond")
    assert out_b.dtype == jnp.float32  # upcast before combining: no bfloat16 rounding of the result
    cf, uf = np.asarray(cb, np.float64), np.asarray(ub, np.float64)
    assert_close(out_b, cf + 2.0 * (cf - uf), cfg_bound(cf, uf, 3.0), "bfloat16 inputs")


def test_cfg_combine_rejects_unknown_convention():
    with pytest.raises(ValueError, match="unknown CFG convention 'both'"):
        cfg_combine(jnp.ones(2), jnp.zeros(2), 2.0, "both")


def guided_truth(cond, uncond, scale, convention):
    """float64 guided truth: the combination of (x0, eps), every other field derived from it."""
    w = np.asarray(scale, np.float64).reshape(-1, 1, 1, 1)
    if convention == "uncond":
        x0 = uncond["x0"] + w * (cond["x0"] - uncond["x0"])
        eps = uncond["eps"] + w * (cond["eps"] - uncond["eps"])
    else:
        x0 = cond["x0"] + w * (cond["x0"] - uncond["x0"])
        eps = cond["eps"] + w * (cond["eps"] - uncond["eps"])
    return make_case(cond["name"], x0, eps)


def prediction_pair(name, seed):
    """float64 truths and jdistill predictions (from eps outputs) for cond and uncond at the same (x_t, t)."""
    cond = truth(name, seed)
    uncond = truth(name, seed + 100, x_t=cond["x_t"])
    x_t, t = jnp.asarray(cond["x_t"], jnp.float32), jnp.asarray(cond["t"])
    schedule = cond["schedule"]
    pred_c = to_prediction(jnp.asarray(cond["eps"], jnp.float32), "eps", x_t, schedule, t)
    pred_u = to_prediction(jnp.asarray(uncond["eps"], jnp.float32), "eps", x_t, schedule, t)
    return cond, uncond, pred_c, pred_u


@pytest.mark.parametrize("convention", CFG_CONVENTIONS)
@pytest.mark.parametrize("name", ["vp_int", "flow", "trigflow"])
def test_guide_keeps_the_path_and_commutes_with_conversion(name, convention):
    cond, uncond, pred_c, pred_u = prediction_pair(name, 20)
    scale = 3.0
    expected = guided_truth(cond, uncond, scale, convention)
    # The guided truth lies on the same x_t (the weights sum to one) ...
    np.testing.assert_allclose(expected["x_t"], cond["x_t"], rtol=1e-12, atol=1e-12)
    # ... and so does jdistill's guided prediction; every parameterization of it is the guided truth's.
    guided = guide(pred_c, pred_u, scale, convention)
    bc, bu = error_bounds(cond, "eps"), error_bounds(uncond, "eps")
    for field in ("x_t", "x0", "eps", "v", "velocity"):
        # The two inputs' errors, weighted by |1 - w| + |w| <= 1 + 2 w.
        tol = (1 + 2 * scale) * (bc[field] + bu[field])
        assert_close(getattr(guided, field), expected[field], tol, f"guided {field}")
    # Guiding the raw outputs of any type and then converting gives the same prediction (CFG is affine, so it
    # commutes with the conversions at fixed (x_t, t)).
    x_t = jnp.asarray(cond["x_t"], jnp.float32)
    for kind in PREDICTION_TYPES:
        raw = cfg_combine(
            jnp.asarray(cond[kind], jnp.float32), jnp.asarray(uncond[kind], jnp.float32), scale, convention
        )
        converted = to_prediction(raw, kind, x_t, cond["schedule"], cond["t"])
        # The combination's float32 rounding is relative to the inputs, up to (1 + 2 w) times larger.
        tol = (1 + 2 * scale) * (error_bounds(cond, kind)["x0"] + error_bounds(uncond, kind)["x0"])
        assert_close(converted.x0, expected["x0"], tol, f"{kind} then convert: x0")
        tol = (1 + 2 * scale) * (error_bounds(cond, kind)["eps"] + error_bounds(uncond, kind)["eps"])
        assert_close(converted.eps, expected["eps"], tol, f"{kind} then convert: eps")
    # The path coefficients are carried over untouched.
    np.testing.assert_array_equal(np.asarray(guided.alpha), np.asarray(pred_c.alpha))
    np.testing.assert_array_equal(np.asarray(guided.dsigma), np.asarray(pred_c.dsigma))


def test_guide_per_sample_scale():
    cond, uncond, pred_c, pred_u = prediction_pair("vp_float", 21)
    scale = np.array([1.0, 2.0, 0.0, 5.0])
    guided = guide(pred_c, pred_u, jnp.asarray(scale, jnp.float32), "uncond")
    expected = guided_truth(cond, uncond, scale, "uncond")
    bc, bu = error_bounds(cond, "eps"), error_bounds(uncond, "eps")
    w = scale.reshape(-1, 1, 1, 1)
    for field in ("x0", "eps"):
        assert_close(getattr(guided, field), expected[field], (1 + 2 * w) * (bc[field] + bu[field]), field)
    # Scale 1 is the conditional prediction, scale 0 the unconditional one (to rounding).
    np.testing.assert_allclose(np.asarray(guided.x0[0]), np.asarray(pred_c.x0[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(guided.eps[2]), np.asarray(pred_u.eps[2]))


def test_is_identity():
    assert is_identity(1.0, "uncond") and is_identity(1, "uncond")
    assert is_identity(0.0, "cond")
    assert not is_identity(0.0, "uncond") and not is_identity(1.0, "cond")
    assert not is_identity(7.5, "uncond") and not is_identity(7.5, "cond")
    assert is_identity(None, "uncond") and is_identity(None, "cond")
    # A traced or array scale is never assumed to be the identity.
    assert not is_identity(jnp.asarray(1.0), "uncond")
    assert not is_identity(jnp.asarray([0.0, 0.0]), "cond")


class CountingDenoiser:
    """predict(x_t, t, cond) on a VP schedule whose eps output depends on x_t, t and a (label, emb) pytree."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.shape, t.shape, jax.tree.map(lambda a: a.shape, cond)))
        label, emb = cond["label"], cond["emb"]
        tt = t.astype(jnp.float32)[:, None, None]
        out = (
            0.3 * x_t * jnp.cos(tt / 700)
            + 0.1 * label[:, None, None]
            + jnp.tanh(emb)[:, :, None] * jnp.sin(tt / 300)
        )
        return to_prediction(out, "eps", x_t, VP, t)


def guidance_inputs(timesteps: list[int], seed: int):
    """x_t (B, 2, 2) drawn with ``seed``, the timesteps, a condition (labels 1..B, emb drawn with seed + 1) and
    an unconditional input that broadcasts against it."""
    b = len(timesteps)
    x_t = jnp.asarray(rand((b, 2, 2), seed))
    cond = {"label": jnp.arange(1.0, b + 1), "emb": jnp.asarray(rand((b, 2), seed + 1))}
    uncond = {"label": jnp.asarray(0.0), "emb": jnp.zeros((1, 2))}
    return x_t, jnp.asarray(timesteps), cond, uncond


@pytest.mark.parametrize(("scale", "convention"), [(4.0, "uncond"), (2.5, "cond"), ("per_sample", "uncond")])
def test_guided_predict_is_one_batched_call(scale, convention):
    b = 3
    x_t, t, cond, uncond = guidance_inputs([10, 500, 990], seed=30)
    if scale == "per_sample":
        scale = jnp.asarray([1.0, 3.0, 6.0])
    model = CountingDenoiser()
    out = guided_predict(model, x_t, t, cond, uncond, scale, convention)
    assert len(model.calls) == 1
    assert model.calls[0][0] == (2 * b, 2, 2) and model.calls[0][1] == (2 * b,)
    assert model.calls[0][2] == {"label": (2 * b,), "emb": (2 * b, 2)}
    reference = CountingDenoiser()
    c = reference(x_t, t, cond)
    u = reference(x_t, t, {"label": jnp.zeros(b), "emb": jnp.zeros((b, 2))})
    assert len(reference.calls) == 2
    w = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1, 1, 1), (b, 1, 1))
    for field in ("x0", "eps"):
        c64, u64 = np.asarray(getattr(c, field), np.float64), np.asarray(getattr(u, field), np.float64)
        expected = u64 + w * (c64 - u64) if convention == "uncond" else c64 + w * (c64 - u64)
        # x0 at t = 990 divides by alpha ~ 0.07: the batched and separate passes differ by float32 rounding.
        np.testing.assert_allclose(np.asarray(getattr(out, field)), expected, atol=2e-5, err_msg=field)
    # The coefficients are per sample (B, 1, 1), not doubled.
    assert out.alpha.shape == (b, 1, 1)
    np.testing.assert_array_equal(np.asarray(out.alpha), np.asarray(c.alpha))


def test_guided_predict_identity_scales_make_a_single_unbatched_call():
    x_t, t, cond, uncond = guidance_inputs([100, 200], seed=32)
    expected = CountingDenoiser()(x_t, t, cond)
    for scale, convention in ((1.0, "uncond"), (0.0, "cond"), (None, "uncond")):
        model = CountingDenoiser()
        out = guided_predict(model, x_t, t, cond, uncond, scale, convention)
        assert len(model.calls) == 1 and model.calls[0][0] == (2, 2, 2)
        np.testing.assert_array_equal(np.asarray(out.eps), np.asarray(expected.eps))


def test_guided_predict_under_jit_with_traced_scale():
    x_t, t, cond, uncond = guidance_inputs([300, 700], seed=34)
    model = CountingDenoiser()
    # A traced scale of 1.0 must still guide (the result equals cond because the combination is the identity).
    out = jax.jit(lambda s: guided_predict(model, x_t, t, cond, uncond, s, "uncond").eps)(jnp.asarray(1.0))
    assert model.calls[0][0] == (4, 2, 2)
    c = CountingDenoiser()(x_t, t, cond)
    np.testing.assert_allclose(np.asarray(out), np.asarray(c.eps), atol=1e-6)


def test_select_cond_on_pytrees():
    cond = {
        "emb": jnp.asarray(rand((4, 3, 2), 40)),
        "pooled": jnp.arange(8.0).reshape(4, 2),
        "ids": jnp.arange(4),
    }
    uncond = {"emb": jnp.zeros((1, 3, 2)), "pooled": jnp.full((2,), -1.0), "ids": jnp.asarray(-1)}
    use_uncond = jnp.asarray([True, False, False, True])
    out = select_cond(cond, uncond, use_uncond)
    assert jax.tree.structure(out) == jax.tree.structure(cond)
    mask = np.array([True, False, False, True])
    emb = np.where(mask[:, None, None], 0.0, np.asarray(cond["emb"]))
    np.testing.assert_array_equal(np.asarray(out["emb"]), emb)
    np.testing.assert_array_equal(
        np.asarray(out["pooled"]), np.where(mask[:, None], -1.0, np.arange(8.0).reshape(4, 2))
    )
    np.testing.assert_array_equal(np.asarray(out["ids"]), [-1, 1, 2, -1])
    assert out["ids"].dtype == cond["ids"].dtype
    # All-False keeps cond, all-True gives the broadcast uncond.
    keep = select_cond(cond, uncond, jnp.zeros(4, bool))
    np.testing.assert_array_equal(np.asarray(keep["emb"]), np.asarray(cond["emb"]))
    drop = select_cond(cond, uncond, jnp.ones(4, bool))
    np.testing.assert_array_equal(np.asarray(drop["pooled"]), -np.ones((4, 2)))
