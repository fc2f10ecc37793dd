"""The analytic Gaussian-mixture teacher against Tweedie's formula on the exact marginal density."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.schedules import FlowSchedule, TrigFlowSchedule, VPSchedule
from jdistill.evaluate.gmm import mode_statistics
from jdistill.teachers.gmm import GaussianMixture, GMMTeacher

MIX = GaussianMixture()


def log_marginal(x, alpha, sigma, label):
    """log p_t(x | label) written directly from the mixture (no use of the teacher's code)."""
    angles = 2 * np.pi * np.arange(8) / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    var = alpha**2 * 0.1**2 + sigma**2
    logp = -0.5 * jnp.sum((x - alpha * means) ** 2, -1) / var - jnp.log(2 * jnp.pi * var)
    allowed = (np.arange(8) % 2 == label) | (label == 2)
    return jax.scipy.special.logsumexp(jnp.where(allowed, logp, -jnp.inf))


@pytest.mark.parametrize(
    "schedule,times",
    [
        (VPSchedule.from_betas(), [0, 20, 300, 700, 999]),
        (FlowSchedule(), [0.02, 0.3, 0.7, 0.98]),
        (TrigFlowSchedule(), [0.05, 0.8, 1.5]),
    ],
)
@pytest.mark.parametrize("label", [0, 1, 2])
def test_denoiser_matches_tweedie(schedule, times, label):
    teacher = GMMTeacher(MIX, schedule)
    x = 1.5 * jax.random.normal(jax.random.key(label), (16, 2))
    for t in times:
        tt = jnp.full((16,), t)
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(jnp.asarray(t)))
        score = jax.vmap(jax.grad(log_marginal), (0, None, None, None))(x, alpha, sigma, label)
        x0 = (x + sigma**2 * score) / alpha  # Tweedie: E[x0 | x_t] = (x_t + sigma^2 grad log p_t) / alpha
        pred = teacher.predict({}, x, tt, jnp.full((16,), label))
        np.testing.assert_allclose(pred.x0, x0, atol=2e-5 / alpha)
        np.testing.assert_allclose(pred.score, score, rtol=1e-4, atol=1e-4 / sigma)


def test_cfg_with_null_label_is_unconditional():
    teacher = GMMTeacher(MIX, VPSchedule.from_betas())
    x = jax.random.normal(jax.random.key(0), (8, 2))
    t = jnp.full((8,), 500)
    cond = jnp.zeros((8,), jnp.int32)
    guided = predict_cfg(teacher, {}, x, t, cond, jnp.int32(2), 3.0, "uncond")
    c = teacher.predict({}, x, t, cond)
    u = teacher.predict({}, x, t, jnp.full((8,), 2))
    np.testing.assert_allclose(guided.x0, u.x0 + 3.0 * (c.x0 - u.x0), rtol=1e-5, atol=1e-5)


def test_mixture_samples_and_mode_statistics():
    x, labels = MIX.sample(np.random.default_rng(0), 8000)
    stats = mode_statistics(x, labels, MIX.means, MIX.mode_labels)
    assert stats["within_radius"] == 1.0  # 0.5 is 5 standard deviations
    assert stats["class_consistency"] == 1.0
    assert abs(stats["min_mode_share"] - 1 / 8) < 0.02
    x1, l1 = MIX.sample(np.random.default_rng(1), 1000, labels=np.ones(1000, np.int32))
    assert (l1 == 1).all() and mode_statistics(x1, l1, MIX.means, MIX.mode_labels)["class_consistency"] == 1.0
    # Wrong labels are caught: swap classes.
    assert mode_statistics(x, 1 - labels, MIX.means, MIX.mode_labels)["class_consistency"] == 0.0
