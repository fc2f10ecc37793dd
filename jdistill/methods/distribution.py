"""Pure pieces of distribution-matching distillation (DMD, DMD2, SiD and their variants).

All take x0-predictions (``Prediction.x0``) and compute in float32: a difference of two x0 estimates at low noise is mostly rounding noise in bf16.

- ``dmd_direction``: g = (x0_fake - x0_real) / mean_CHW |x - x0_real|, per sample, NaN-safe, under
  stop-gradient. With the pseudo-target loss its gradient with respect to x is g / x.size.
- ``sid_generator_loss``: Score identity Distillation, per sample; gradients flow through x and through
  the inputs of both frozen networks (the caller differentiates with respect to the generator only).
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
