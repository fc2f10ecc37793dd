"""Distribution-matching pieces against independent references: the DMD direction against true score
differences (autodiff of the noised mixture density), SiD's gradient against its hand-derived closed form on a
linear toy, GAN losses against their formulas, finite masks, and backward simulation of multi-step students."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.diffusion.parameterization import to_prediction
from jdistill.diffusion.schedules import VPSchedule
from jdistill.methods.common import denoising_loss, pseudo_target_loss
from jdistill.methods.distribution import (
    dmd_direction,
    finite_denoising_loss,
    finite_mean,
    finite_pseudo_target_loss,
    finite_rows,
    gan_losses,
    masked_mean,
    nonfinite_count,
    sid_generator_loss,
    sid_weight,
    zero_bad_rows,
)
from jdistill.methods.rollout import FewStepStudent, backward_simulate
from jdistill.teachers.gmm import GaussianMixture, GMMTeacher

SCHEDULE = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000)


def log_density(mixture: GaussianMixture, x_t, alpha, sigma):
    """log p_t(x_t) of the noised mixture (all modes), written directly: an independent route to the score."""
    var = alpha**2 * mixture.std**2 + sigma**2
    d2 = jnp.sum((x_t[None] - alpha * jnp.asarray(mixture.means)) ** 2, axis=-1)
    return jax.scipy.special.logsumexp(-0.5 * d2 / var) - jnp.log(var)


def test_dmd_direction_is_the_weighted_score_difference():
    real_mix, fake_mix = GaussianMixture(radius=2.0), GaussianMixture(radius=1.3, std=0.3)
    real, fake = GMMTeacher(real_mix, SCHEDULE), GMMTeacher(fake_mix, SCHEDULE)
    rng = np.random.default_rng(0)
    n = 64
    x = jnp.asarray(rng.standard_normal((n, 2)) * 2, jnp.float32)  # "generated" samples
    t = jnp.asarray(rng.integers(20, 980, n), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((n, 2)), jnp.float32)
    x_t = SCHEDULE.add_noise(x, eps, t)
    null = jnp.full((n,), real_mix.null_label)
    x0_real = real.predict({}, x_t, t, null).x0
    x0_fake = fake.predict({}, x_t, t, null).x0
    g = dmd_direction(x, x0_real, x0_fake)

    alpha, sigma = SCHEDULE.alpha_sigma(t)
    score = jax.vmap(jax.grad(log_density, argnums=1), in_axes=(None, 0, 0, 0))
    s_real = score(real_mix, x_t, alpha, sigma)
    s_fake = score(fake_mix, x_t, alpha, sigma)
    # DMD's weighting w_t = sigma_t^2 / alpha_t / mean|x - x0_real| times (s_fake - s_real).
    w = (sigma**2 / alpha)[:, None] / jnp.mean(jnp.abs(x - x0_real), axis=1, keepdims=True)
    np.testing.assert_allclose(g, w * (s_fake - s_real), rtol=2e-3, atol=1e-4)
    # The pseudo-target loss turns it into a gradient g / x.size on x.
    grad = jax.grad(lambda y: pseudo_target_loss(y, g))(x)
    np.testing.assert_allclose(grad, g / x.size, rtol=1e-4, atol=1e-8)  # x - (x - g) rounds in float32


def test_dmd_direction_keeps_bad_rows_and_stops_gradients():
    x = jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [3.0, 3.0]])
    real = jnp.array([[0.0, 0.0], [0.0, 0.0], [3.0, 3.0]])  # row 3: x == x0_real, normaliser 0 -> floor
    fake = jnp.array([[1.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
    g = dmd_direction(x, real, fake)
    np.testing.assert_allclose(g[0], [1.0 / 1.5, 1.0 / 1.5])
    # The bad row stays non-finite (finite_pseudo_target_loss leaves it out and counts it); the others do not.
    assert not np.any(np.isfinite(g[1])) and np.all(np.isfinite(g[2]))
    grads = jax.grad(lambda a, b, c: jnp.sum(dmd_direction(a, b, c)), argnums=(0, 1, 2))(x, real, fake)
    assert all(not np.any(np.asarray(gr)) for gr in grads)


def test_sid_gradient_matches_the_hand_derived_closed_form():
    """Linear toy: generator x = theta * z; frozen "networks" f_r(x_t) = a x_t + b, f_f(x_t) = c x_t + d with
    x_t = x + s eps. With omega held fixed (stop-gradient), L = omega sum (f_r - f_f)((f_r - x) - alpha (f_r - f_f))
    and, writing D = f_r - f_f = (a - c) x_t + (b - d), R = f_r - x:
        dL/dtheta = omega sum [ (a - c) z (R - alpha D) + D ((a - 1) z - alpha (a - c) z) ].
    """
    rng = np.random.default_rng(1)
    z, eps = (jnp.asarray(rng.standard_normal((3, 5)), jnp.float32) for _ in range(2))
    a, b, c, d, s, alpha = 0.8, 0.3, 0.5, -0.2, 0.7, 1.2

    def loss(theta):
        x = theta * z
        x_t = x + s * eps
        return jnp.mean(sid_generator_loss(x, a * x_t + b, c * x_t + d, alpha))

    theta = 1.7
    x = theta * z
    x_t = x + s * eps
    f_r = a * x_t + b
    D = (a - c) * x_t + (b - d)
    R = f_r - x
    omega = 1.0 / np.maximum(np.mean(np.abs(x - f_r), axis=1), 1e-5)
    per_row = np.sum((a - c) * z * (R - alpha * D) + D * ((a - 1) * z - alpha * (a - c) * z), axis=1)
    want = np.mean(omega * per_row)
    np.testing.assert_allclose(jax.grad(loss)(theta), want, rtol=1e-5)
    # The weight alone is stop-gradiented: dropping it from the graph changes nothing above.
    assert jax.grad(lambda y: jnp.sum(sid_weight(y, f_r)))(x).max() == 0


def test_gan_losses_match_their_formulas():
    real = jnp.array([[2.0, -1.0], [0.5, 0.5]])
    fake = jnp.array([[-0.3, 1.0], [4.0, -4.0]])
    d, g = gan_losses(real, fake, "bce")
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    np.testing.assert_allclose(d, sp(-real).mean(1) + sp(fake).mean(1), rtol=1e-6)
    np.testing.assert_allclose(g, sp(-fake).mean(1), rtol=1e-6)
    d, g = gan_losses(real, fake, "hinge")
    np.testing.assert_allclose(d, np.maximum(1 - real, 0).mean(1) + np.maximum(1 + fake, 0).mean(1))
    np.testing.assert_allclose(g, -fake.mean(1))
    with pytest.raises(ValueError, match="unknown GAN loss 'wasserstein'"):
        gan_losses(real, fake, "wasserstein")


def test_finite_masks_weight_instead_of_dropping():
    x = jnp.array([[1.0, 2.0], [jnp.inf, 0.0], [3.0, 4.0]])
    ok = finite_rows(x)
    assert ok.tolist() == [True, False, True]
    clean = zero_bad_rows(x, ok)
    assert np.all(np.isfinite(clean)) and clean[1].tolist() == [0.0, 0.0]

    def loss(y):
        values = jnp.sum(zero_bad_rows(y, ok) ** 2, axis=1)
        return masked_mean(values, ok)[0]

    assert float(loss(x)) == pytest.approx((5.0 + 25.0) / 2)
    grad = jax.grad(loss)(x)
    assert np.all(np.isfinite(grad)) and grad[1].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(grad[0], [1.0, 2.0])  # d/dy (|y|^2 / 2)
    mean, left_out = masked_mean(jnp.array([jnp.nan, jnp.nan]), jnp.array([True, True]))
    assert float(mean) == 0.0 and float(left_out) == 2.0


def test_finite_losses_are_the_plain_losses_on_finite_batches():
    """Bit for bit, values and gradients: the masks and the rescaling by n / n change nothing."""
    rng = np.random.default_rng(2)
    x, g = (jnp.asarray(rng.standard_normal((6, 3, 2)), jnp.float32) for _ in range(2))
    loss, good = finite_pseudo_target_loss(x, g)
    assert bool(jnp.all(good)) and float(nonfinite_count(good)) == 0.0
    assert float(loss) == float(pseudo_target_loss(x, g))
    same = jax.grad(lambda y: finite_pseudo_target_loss(y, g)[0])(x) == jax.grad(pseudo_target_loss)(x, g)
    assert bool(jnp.all(same))
    assert float(finite_mean(jnp.abs(g), good)) == float(jnp.mean(jnp.abs(g)))

    t = jnp.asarray([0, 100, 400, 800, 999, 20])
    out, x0, eps = (jnp.asarray(rng.standard_normal((6, 2)), jnp.float32) for _ in range(3))
    x_t = SCHEDULE.add_noise(x0, eps, t)
    for target, weighting in (("eps", "alpha2"), ("v", "uniform"), ("x0", "snr")):

        def plain(o, target=target, weighting=weighting):
            return denoising_loss(to_prediction(o, "eps", x_t, SCHEDULE, t), x0, eps, target, weighting)

        def finite(o, target=target, weighting=weighting):
            pred = to_prediction(o, "eps", x_t, SCHEDULE, t)
            return finite_denoising_loss(pred, x0, eps, target, weighting)[0]

        assert float(finite(out)) == float(plain(out))
        assert bool(jnp.all(jax.grad(finite)(out) == jax.grad(plain)(out)))


def test_finite_pseudo_target_loss_is_the_good_rows_loss_and_counts_the_others():
    rng = np.random.default_rng(3)
    x, g = (rng.standard_normal((7, 4)).astype(np.float32) for _ in range(2))
    x[1, 2] = np.nan  # a non-finite sample
    g[4] = np.inf  # a non-finite direction
    ok = np.ones(7, bool)
    ok[6] = False  # a sample the generator marked (zeroed upstream)
    keep = np.array([0, 2, 3, 5])
    loss, good = finite_pseudo_target_loss(jnp.asarray(x), jnp.asarray(g), jnp.asarray(ok))
    assert np.flatnonzero(good).tolist() == keep.tolist() and float(nonfinite_count(good)) == 3.0
    # 0.5 mean((x - sg(x - g))^2) = 0.5 mean(g^2), gradient g / size, over the kept rows only.
    np.testing.assert_allclose(loss, 0.5 * np.mean(g[keep] ** 2), rtol=1e-5)
    grad = np.asarray(jax.grad(lambda y: finite_pseudo_target_loss(y, jnp.asarray(g), jnp.asarray(ok))[0])(x))
    np.testing.assert_allclose(grad[keep], g[keep] / g[keep].size, rtol=1e-4)
    assert not np.any(grad[[1, 4, 6]])
    assert float(finite_mean(jnp.asarray(np.abs(g)), good)) == pytest.approx(
        np.mean(np.abs(g[keep])), rel=1e-6
    )
    # No finite sample at all: NaN, so that the trainer skips the update and counts it.
    none, _ = finite_pseudo_target_loss(jnp.asarray(x), jnp.asarray(g), jnp.zeros(7, bool))
    assert np.isnan(float(none))


def test_finite_denoising_loss_is_the_good_rows_loss_and_counts_the_others():
    """eps-prediction, x0 target, SNR weights: w (alpha, sigma) mean((x0_hat - x0)^2) by hand, kept rows only."""
    rng = np.random.default_rng(4)
    t = np.array([50, 300, 600, 900, 999])
    x0, eps, out = (rng.standard_normal((5, 3)).astype(np.float32) for _ in range(3))
    out[2, 0] = np.nan  # the network's prediction is not finite for sample 2
    ok = np.array([True, True, True, False, True])  # sample 3 was not finite upstream
    abar = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[t][:, None]
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    x_t = (a * x0 + s * eps).astype(np.float32)
    pred = to_prediction(jnp.asarray(out), "eps", jnp.asarray(x_t), SCHEDULE, jnp.asarray(t))
    loss, good = finite_denoising_loss(pred, jnp.asarray(x0), jnp.asarray(eps), "x0", "snr", jnp.asarray(ok))
    keep = np.array([0, 1, 4])
    assert np.flatnonzero(good).tolist() == keep.tolist() and float(nonfinite_count(good)) == 2.0
    x0_hat = (x_t - s * out) / a
    per_row = (a / s)[:, 0] ** 2 * np.mean((x0_hat - x0) ** 2, axis=1)
    np.testing.assert_allclose(loss, per_row[keep].mean(), rtol=1e-4)

    def f(o):
        p = to_prediction(o, "eps", jnp.asarray(x_t), SCHEDULE, jnp.asarray(t))
        return finite_denoising_loss(p, jnp.asarray(x0), jnp.asarray(eps), "x0", "snr", jnp.asarray(ok))[0]

    grad = np.asarray(jax.grad(f)(jnp.asarray(out)))
    assert np.all(np.isfinite(grad)) and not np.any(grad[[2, 3]])


class AffineStudent:
    """A denoiser whose x0 prediction is scale * x_t + shift (params = (scale, shift))."""

    schedule = SCHEDULE

    def predict(self, params, x_t, t, cond):
        from jdistill.diffusion.parameterization import from_x0

        scale, shift = params
        return from_x0(scale * x_t + shift, x_t, SCHEDULE, t)


def test_backward_simulation_runs_k_steps_without_gradient():
    student = AffineStudent()
    params = (jnp.float32(0.5), jnp.float32(0.25))
    ts = (999.0, 749.0, 499.0, 249.0)
    z = jax.random.normal(jax.random.key(0), (4, 3))
    key = jax.random.key(1)

    def predict_x0(p, x, t):
        return student.predict(p, x, t, None).x0

    for k in range(4):
        x, t = backward_simulate(predict_x0, params, z, ts, jnp.int32(k), key, SCHEDULE)
        assert t.tolist() == [ts[k]] * 4
        want = z  # by hand: predict, re-noise with the i-th fresh noise
        for i in range(k):
            x0 = 0.5 * want + 0.25
            noise = jax.random.normal(jax.random.fold_in(key, i), z.shape)
            want = SCHEDULE.add_noise(x0, noise, jnp.full((4,), ts[i + 1]))
        np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)

    # Gradients reach the parameters through the last (trained) step only.
    def out(p, k):
        x, t = backward_simulate(predict_x0, p, z, ts, jnp.int32(k), key, SCHEDULE)
        return jnp.sum(predict_x0(p, x, t))

    g_scale, g_shift = jax.grad(out)(params, 2)
    x2, _ = backward_simulate(predict_x0, params, z, ts, jnp.int32(2), key, SCHEDULE)
    np.testing.assert_allclose(g_scale, jnp.sum(x2), rtol=1e-5)
    assert float(g_shift) == pytest.approx(x2.size)


def test_few_step_student_draws_every_step_and_samples_all_of_them():
    student = FewStepStudent(AffineStudent(), (3,), (999.0, 499.0))
    params = (jnp.float32(0.0), jnp.float32(1.0))  # x0 = 1 whatever the input
    outs = {float(student.generate(params, jnp.zeros((2,)), jax.random.key(i))[0, 0]) for i in range(20)}
    assert outs == {1.0}
    sample = student.sample(params, jnp.zeros((2,)), jax.random.key(0))
    np.testing.assert_allclose(sample, 1.0)
    with pytest.raises(ValueError, match="decrease strictly"):
        FewStepStudent(AffineStudent(), (3,), (499.0, 999.0))
