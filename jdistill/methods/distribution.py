"""Pure pieces of distribution-matching distillation (DMD, DMD2, SiD and their variants).

All take x0-predictions (``Prediction.x0``) and compute in float32: a difference of two x0 estimates at low noise is mostly rounding noise in bf16.

- ``dmd_direction``: g = (x0_fake - x0_real) / mean_CHW |x - x0_real|, per sample, under stop-gradient
  (a sample with non-finite inputs keeps a non-finite direction). With the pseudo-target loss its gradient
  with respect to x is g / x.size.
- ``sid_generator_loss``: Score identity Distillation, per sample; gradients flow through x and through
  the inputs of both frozen networks (the caller differentiates with respect to the generator only).
- ``generator_weight``: the generator loss's per-sample weight: SiD's 1 / mean|x - f_real|, or one of SiD-DiT's
  functions of the flow time (default there: 1 - sigma).
- ``logit_normal_times``: flow times sigmoid(N(mean, std^2)) (SiD-DiT draws both networks' times so).
- ``gan_losses``: diffusion-GAN losses (non-saturating BCE, hinge) from discriminator logits.
- ``finite_rows`` / ``masked_mean``: per-sample finite masks as loss weights, instead of dropping samples
  (no dynamic shapes under jit).
- ``finite_pseudo_target_loss`` / ``finite_denoising_loss`` / ``nonfinite_count``: losses over the finite
  samples only, and the number of samples left out, which the losses report as the metric ``NONFINITE_ROWS``
  (the trainer's metrics log carries it as ``<update>/nonfinite_rows``): a non-finite sample is counted,
  never silently replaced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdistill.diffusion.parameterization import Prediction
from jdistill.methods.common import denoising_loss, pseudo_target_loss

GAN_KINDS = ("bce", "hinge")
NONFINITE_ROWS = "nonfinite_rows"  # metric: samples of the batch a loss left out for non-finite values


def _per_sample_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _per_sample_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _rows(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def dmd_direction(x: jax.Array, x0_real: jax.Array, x0_fake: jax.Array, eps: float = 1e-6) -> jax.Array:
    """The DMD/DMD2 distribution-matching direction, float32, stop-gradient.

    Equals w_t (s_fake - s_real) with DMD's weighting w_t = sigma_t^2 / alpha_t / mean|x - x0_real|. A sample
    whose inputs are not finite gets a non-finite direction: ``finite_pseudo_target_loss`` leaves it out of
    the loss and counts it.
    """
    x, real, fake = (jax.lax.stop_gradient(a).astype(jnp.float32) for a in (x, x0_real, x0_fake))
    norm = jnp.maximum(_per_sample_mean(jnp.abs(x - real)), eps)
    return jax.lax.stop_gradient((fake - real) / _rows(norm, x))


def sid_weight(x: jax.Array, x0_real: jax.Array, floor: float = 1e-5) -> jax.Array:
    """SiD's per-sample weight omega = 1 / sg(max(mean_CHW |x - f_real|, floor))."""
    diff = jax.lax.stop_gradient(x.astype(jnp.float32) - x0_real.astype(jnp.float32))
    return 1.0 / jnp.maximum(_per_sample_mean(jnp.abs(diff)), floor)


# SiD-DiT's generator weightings (its --weighting_scheme; "sid" is its "sid_legacy"), functions of the flow time
# sigma = t on x_t = (1 - t) x + t eps, except SiD's own.
GENERATOR_WEIGHTINGS = (
    "sid",
    "1_minus_sigma",
    "1_minus_sigma_squared",
    "snr",
    "snr_sqrt",
    "1_over_sigma",
    "1_over_sigma2",
)
FLOW_TIME_WEIGHTINGS = GENERATOR_WEIGHTINGS[1:]


def generator_weight(
    kind: str, x: jax.Array, x0_real: jax.Array, t: jax.Array, floor: float = 1e-5
) -> jax.Array:
    """Per-sample weight (B,) of the SiD generator loss, float32, stop-gradient; ``t`` is the flow time.

    "sid": 1 / max(mean|x - f_real|, floor). On the flow path (sigma = t, alpha = 1 - t): "1_minus_sigma"
    1 - t; "1_minus_sigma_squared" (1 - t)^2; "snr_sqrt" 1 / max(t / (1 - t), floor); "snr" 1 / max((t / (1 -
    t))^2, floor); "1_over_sigma" 1 / max(t, floor); "1_over_sigma2" 1 / max(t^2, floor). The floors are where
    SiD-DiT's code clips (none for the (1 - t) powers).
    """
    if kind == "sid":
        return sid_weight(x, x0_real, floor)
    if kind not in FLOW_TIME_WEIGHTINGS:
        raise ValueError(f"unknown generator weighting {kind!r}; choose one of {GENERATOR_WEIGHTINGS}")
    s = jax.lax.stop_gradient(jnp.asarray(t, jnp.float32)).reshape(-1)
    if kind == "1_minus_sigma":
        return 1.0 - s
    if kind == "1_minus_sigma_squared":
        return jnp.square(1.0 - s)
    inverse_of = {
        "snr_sqrt": lambda: s / (1.0 - s),
        "snr": lambda: jnp.square(s / (1.0 - s)),
        "1_over_sigma": lambda: s,
        "1_over_sigma2": lambda: jnp.square(s),
    }[kind]()
    return 1.0 / jnp.maximum(inverse_of, floor)


def logit_normal_times(key: jax.Array, shape: tuple[int, ...], mean: float, std: float) -> jax.Array:
    """Flow times sigmoid(mean + std n), n ~ N(0, 1), float32 in (0, 1): density
    phi((logit t - mean) / std) / (std t (1 - t)). SiD-DiT: mean ln 2, std 1.6 (median time 2/3)."""
    if not std > 0:
        raise ValueError(f"logit-normal std must be positive, got {std}")
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))


def sid_generator_loss(
    x: jax.Array, x0_real: jax.Array, x0_fake: jax.Array, alpha: float, weight: jax.Array | None = None
) -> jax.Array:
    """Per-sample SiD loss: weight * sum_CHW (f_r - f_f) * ((f_r - x) - alpha (f_r - f_f)).

    Nothing is stop-gradiented here but the default weight (``sid_weight``); ``x0_real`` and ``x0_fake``
    must be computed from x_t that depends on the generator, with the frozen networks' parameters held fixed.
    SiD reduces with sum over elements and mean over the batch: take ``jnp.mean`` of the result.
    """
    x, real, fake = (a.astype(jnp.float32) for a in (x, x0_real, x0_fake))
    if weight is None:
        weight = sid_weight(x, real)
    gap = real - fake
    return weight * _per_sample_sum(gap * ((real - x) - alpha * gap))


def gan_losses(
    logits_real: jax.Array, logits_fake: jax.Array, kind: str = "bce"
) -> tuple[jax.Array, jax.Array]:
    """(discriminator loss, generator loss), each per sample (mean over any logit map).

    bce (non-saturating): D = softplus(-D(real)) + softplus(D(fake)), G = softplus(-D(fake)).
    hinge: D = relu(1 - D(real)) + relu(1 + D(fake)), G = -D(fake).
    The caller decides what is stop-gradiented: sg(fake) for the D step, frozen D parameters for the G step.
    """
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    if kind == "bce":
        d = _per_sample_mean(jax.nn.softplus(-real)) + _per_sample_mean(jax.nn.softplus(fake))
        g = _per_sample_mean(jax.nn.softplus(-fake))
    elif kind == "hinge":
        d = _per_sample_mean(jax.nn.relu(1.0 - real)) + _per_sample_mean(jax.nn.relu(1.0 + fake))
        g = -_per_sample_mean(fake)
    else:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {GAN_KINDS}")
    return d, g


def finite_rows(*arrays: jax.Array) -> jax.Array:
    """Per-sample mask: True where every element of every array is finite in that sample."""
    ok = None
    for a in arrays:
        row = jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)
        ok = row if ok is None else ok & row
    return ok


def zero_bad_rows(x: jax.Array, ok: jax.Array) -> jax.Array:
    """Non-finite samples replaced by zeros, so that downstream networks see finite inputs and no NaN reaches
    a gradient (a NaN multiplied by a zero cotangent is still NaN). Not a way to hide them: the losses leave
    these samples out (``masked_mean``, ``finite_pseudo_target_loss``) and report ``nonfinite_count(ok)``."""
    return jnp.where(_rows(ok, x), x, jnp.zeros_like(x))


def masked_mean(values: jax.Array, ok: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, left out): the mean of per-sample ``values`` over the samples where ``ok`` and the value itself
    is finite (0 when there are none), and how many samples it left out, for a metric ending in
    ``nonfinite_rows``: the rows a loss drops are reported, never dropped silently."""
    ok = ok & jnp.isfinite(values)
    total = jnp.sum(jnp.where(ok, values, 0.0))
    return total / jnp.maximum(jnp.sum(ok.astype(jnp.float32)), 1.0), nonfinite_count(ok)


def nonfinite_count(ok: jax.Array) -> jax.Array:
    """How many samples ``ok`` (a per-sample mask) marks as not finite, as float32 (a metric)."""
    return jnp.sum(jnp.logical_not(ok).astype(jnp.float32))


def _finite_scale(good: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(n / max(n_good, 1), n_good): turns a mean over all n rows, the bad ones zeroed, into the mean over the
    good rows; exactly 1 when every row is good, so that finite batches give the plain mean to the bit."""
    n_good = jnp.sum(good.astype(jnp.float32))
    return jnp.float32(good.shape[0]) / jnp.maximum(n_good, 1.0), n_good


def finite_mean(x: jax.Array, good: jax.Array) -> jax.Array:
    """Mean of ``x`` over the elements of the rows ``good`` marks (0 when there are none): ``jnp.mean(x)``
    when every row is good."""
    scale, _ = _finite_scale(good)
    return jnp.mean(zero_bad_rows(x, good)) * scale


def finite_pseudo_target_loss(
    x: jax.Array, direction: jax.Array, ok: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(loss, good): ``common.pseudo_target_loss`` over the samples where ``x`` and ``direction`` are finite
    (and ``ok``, e.g. the generator's own finite mask), and that per-sample mask.

    The other samples contribute neither value nor gradient, and the mean is over the good samples only: the
    loss and its gradient equal those of the good samples alone. With every sample finite this is
    ``pseudo_target_loss`` to the bit. With none, the loss is NaN, so that the trainer skips the update and
    counts it towards ``max_nonfinite_streak``.
    """
    good = finite_rows(x, direction)
    good = good if ok is None else good & ok
    scale, n_good = _finite_scale(good)
    loss = pseudo_target_loss(zero_bad_rows(x, good), zero_bad_rows(direction, good)) * scale
    return jnp.where(n_good > 0, loss, jnp.nan), good


def finite_denoising_loss(
    pred: Prediction, x0: jax.Array, eps: jax.Array, target: str, weighting: str, ok: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(loss, good): ``common.denoising_loss`` over the samples whose prediction is finite (and ``ok``, e.g.
    the generated sample's finite mask), and that per-sample mask; the same rules as
    ``finite_pseudo_target_loss`` (the good samples' mean, bitwise the plain loss when all are finite, NaN
    when none is)."""
    good = finite_rows(pred.x0, pred.eps)
    good = good if ok is None else good & ok
    truth_x0, truth_eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
    # A bad sample's prediction is replaced by the truth: zero error, zero gradient.
    safe = pred.replace(
        x0=jnp.where(_rows(good, truth_x0), pred.x0, truth_x0),
        eps=jnp.where(_rows(good, truth_eps), pred.eps, truth_eps),
    )
    scale, n_good = _finite_scale(good)
    loss = denoising_loss(safe, x0, eps, target, weighting) * scale
    return jnp.where(n_good > 0, loss, jnp.nan), good
