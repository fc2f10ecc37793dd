"""Pure pieces of distribution-matching distillation (DMD, DMD2, SiD and their variants).

All take x0-predictions (``Prediction.x0``) and compute in float32: a difference of two x0 estimates at low noise is mostly rounding noise in bf16.

- ``dmd_direction``: g = (x0_fake - x0_real) / mean_CHW |x - x0_real|, per sample, NaN-safe, under
  stop-gradient. With the pseudo-target loss its gradient with respect to x is g / x.size.
- ``sid_generator_loss``: Score identity Distillation, per sample; gradients flow through x and through
  the inputs of both frozen networks (the caller differentiates with respect to the generator only).
- ``generator_weight``: the generator loss's per-sample weight: SiD's 1 / mean|x - f_real|, or one of SiD-DiT's
  functions of the flow time (default there: 1 - sigma).
- ``logit_normal_times``: flow times sigmoid(N(mean, std^2)) (SiD-DiT draws both networks' times so).
- ``gan_losses``: diffusion-GAN losses (non-saturating BCE, hinge) from discriminator logits.
- ``finite_rows`` / ``masked_mean``: per-sample finite masks as loss weights, instead of dropping samples
  (no dynamic shapes under jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GAN_KINDS = ("bce", "hinge")


def _per_sample_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _per_sample_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _rows(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def dmd_direction(x: jax.Array, x0_real: jax.Array, x0_fake: jax.Array, eps: float = 1e-6) -> jax.Array:
    """The DMD/DMD2 distribution-matching direction, float32, stop-gradient, non-finite entries zeroed.

    Equals w_t (s_fake - s_real) with DMD's weighting w_t = sigma_t^2 / alpha_t / mean|x - x0_real|.
    """
    x, real, fake = (jax.lax.stop_gradient(a).astype(jnp.float32) for a in (x, x0_real, x0_fake))
    norm = jnp.maximum(_per_sample_mean(jnp.abs(x - real)), eps)
    return jax.lax.stop_gradient(
        jnp.nan_to_num((fake - real) / _rows(norm, x), nan=0.0, posinf=0.0, neginf=0.0)
    )


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
    """Non-finite samples replaced by zeros, so that downstream networks see finite inputs; their losses are
    masked out by ``masked_mean`` and contribute no gradient."""
    return jnp.where(_rows(ok, x), x, jnp.zeros_like(x))


def masked_mean(values: jax.Array, ok: jax.Array) -> jax.Array:
    """Mean of per-sample ``values`` over the samples where ``ok`` (and the value itself) is finite."""
    ok = ok & jnp.isfinite(values)
    total = jnp.sum(jnp.where(ok, values, 0.0))
    return total / jnp.maximum(jnp.sum(ok.astype(jnp.float32)), 1.0)
