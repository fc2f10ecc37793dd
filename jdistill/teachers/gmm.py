"""The analytic teacher: a 2-D Gaussian mixture whose denoiser is known in closed form.

Data: ``num_modes`` isotropic Gaussians with means radius * (cos 2 pi k / K, sin 2 pi k / K), standard
deviation ``std`` and equal weights; mode k has class label k mod num_classes. On any Gaussian path
x_t = alpha x0 + sigma eps the posterior mean is exact:

    p(x_t | k) = N(alpha mu_k, (alpha^2 s^2 + sigma^2) I)
    E[x0 | x_t, k] = mu_k + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu_k)
    E[x0 | x_t, c] = sum_k w_k E[x0 | x_t, k],  w_k ∝ p(x_t | k) over the modes of class c (all modes if c is null)

so distillation methods can be checked against the true scores of the true distribution.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.parameterization import Prediction, from_x0
from jdistill.diffusion.schedules import Schedule, broadcast_to


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    num_modes: int = 8
    radius: float = 2.0
    std: float = 0.1
    num_classes: int = 2

    @property
    def means(self) -> np.ndarray:
        angle = 2 * math.pi * np.arange(self.num_modes) / self.num_modes
        return self.radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)

    @property
    def mode_labels(self) -> np.ndarray:
        return np.arange(self.num_modes) % self.num_classes

    @property
    def null_label(self) -> int:
        """The conditioning value meaning "no class" (classifier-free guidance's unconditional input)."""
        return self.num_classes

    def sample(
        self, rng: np.random.Generator, n: int, labels: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """n samples and their class labels; with ``labels`` given, each sample comes from a mode of its class."""
        if labels is None:
            modes = rng.integers(0, self.num_modes, n)
        else:
            per_class = self.num_modes // self.num_classes
            modes = labels + self.num_classes * rng.integers(0, per_class, n)
        x0 = self.means[modes] + self.std * rng.standard_normal((n, 2))
        return x0.astype(np.float32), self.mode_labels[modes].astype(np.int32)

    def posterior_mean(
        self, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, label: jax.Array
    ) -> jax.Array:
        """E[x0 | x_t, label] (float32); alpha and sigma are per-sample (B,), label is (B,) or a scalar."""
        x_t = x_t.astype(jnp.float32)
        means = jnp.asarray(self.means, jnp.float32)  # (K, 2)
        a = broadcast_to(alpha, x_t)  # (B, 1)
        var = a**2 * self.std**2 + broadcast_to(sigma, x_t) ** 2  # (B, 1)
        diff = x_t[:, None, :] - a[:, None, :] * means[None]  # (B, K, 2)
        logits = -0.5 * jnp.sum(diff**2, axis=-1) / var
        label = jnp.broadcast_to(jnp.asarray(label), x_t.shape[:1])
        allowed = (jnp.asarray(self.mode_labels)[None, :] == label[:, None]) | (
            label[:, None] == self.null_label
        )
        weights = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)  # (B, K)
        gain = a * self.std**2 / var  # (B, 1)
        per_mode = means[None] + gain[:, None, :] * diff  # (B, K, 2)
        return jnp.einsum("bk,bkd->bd", weights, per_mode)


@dataclasses.dataclass(frozen=True, eq=False)
class GMMTeacher:
    """The exact denoiser of a ``GaussianMixture`` on ``schedule`` (implements the Denoiser interface)."""

    mixture: GaussianMixture
    schedule: Schedule

    def predict(self, params, x_t: jax.Array, t: jax.Array, cond: jax.Array) -> Prediction:
        del params  # analytic: nothing to learn
        t = jnp.broadcast_to(jnp.asarray(t), x_t.shape[:1])
        alpha, sigma = self.schedule.alpha_sigma(t)
        return from_x0(self.mixture.posterior_mean(x_t, alpha, sigma, cond), x_t, self.schedule, t)
