"""Pure pieces of the trajectory methods (LCM, sCM, MeanFlow): losses, boundary scalings, tangents, time
samplers, and the student inputs beyond (x_t, t)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jdistill.diffusion.denoiser import with_guidance_input
from jdistill.diffusion.schedules import broadcast_to
from jdistill.models.embeddings import guidance_embedding

PyTree = Any


def per_sample_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def time_delta_embedding(delta: jax.Array, dim: int) -> jax.Array:
    """MeanFlow's second time t - r (flow units, [0, 1]) as a UNet's ``timestep_cond``: the guidance embedding's
    sinusoids of 1000 (t - r) minus those of 0, so that r = t adds nothing to the time embedding."""
    delta = jnp.asarray(delta, jnp.float32)
    return guidance_embedding(delta, dim) - guidance_embedding(jnp.zeros_like(delta), dim)


def with_student_inputs(
    cond: PyTree,
    *,
    guidance: jax.Array | None = None,
    guidance_dim: int = 0,
    time_delta: jax.Array | None = None,
    delta_dim: int = 0,
) -> PyTree:
    """The student's conditioning plus its extra inputs: LCM/sCM's guidance-scale embedding (diffusers'
    ``timestep_cond``; ``guidance`` per sample or one value) and MeanFlow's second time: raw as "time_delta"
    (the MLP embeds it itself), or with ``delta_dim`` > 0 embedded as the UNet's ``timestep_cond``
    (``time_delta_embedding``; a UNet has one such input, so not together with a guidance embedding). A label
    becomes {"label": ...}; a UNet's dict is extended."""
    if guidance_dim == 0 and time_delta is None:
        return cond
    out = dict(cond) if isinstance(cond, dict) else {"label": cond}
    n = jax.tree.leaves(cond)[0].shape[0]
    if guidance_dim:
        w = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (n,))
        out["timestep_cond"] = guidance_embedding(w, guidance_dim)
    if time_delta is not None:
        delta = jnp.broadcast_to(jnp.asarray(time_delta, jnp.float32), (n,))
        if delta_dim:
            if guidance_dim:
                raise ValueError(
                    "a UNet student has one timestep_cond: a guidance embedding or t - r, not both"
                )
            out["timestep_cond"] = time_delta_embedding(delta, delta_dim)
        else:
            out["time_delta"] = delta
    return out


def with_guidance(
    cond: PyTree, w: jax.Array | float, *, embedded: bool, convention: str, guidance_dim: int
) -> PyTree:
    """The student's conditioning with CFG scale ``w`` (per sample or one) as its guidance input: a
    guidance-distilled FLUX student's own guidance embedder (``embedded``: the input the teacher's gets for
    ``w`` under ``convention``), else LCM's guidance-scale embedding of width ``guidance_dim`` (0: no input)."""
    if embedded:
        return with_guidance_input(cond, w, convention, jax.tree.leaves(cond)[0].shape[0])
    return with_student_inputs(cond, guidance=w, guidance_dim=guidance_dim)


# ------------------------------------------------------------------------------------------------ LCM


def huber_loss(a: jax.Array, b: jax.Array, c: float) -> jax.Array:
    """mean(sqrt((a - b)^2 + c^2) - c) in float32 (LCM's pseudo-Huber); c = 0 is the mean squared error."""
    diff = a.astype(jnp.float32) - b.astype(jnp.float32)
    if c == 0:
        return jnp.mean(diff**2)
    return jnp.mean(jnp.sqrt(diff**2 + c**2) - c)


def consistency_scalings(
    t: jax.Array, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[jax.Array, jax.Array]:
    """LCM's boundary-condition scalings (c_skip, c_out) at integer timestep t: f = c_skip x_t + c_out x0_hat,
    c_skip = sigma_d^2 / ((10 t)^2 + sigma_d^2), c_out = 10 t / sqrt((10 t)^2 + sigma_d^2); f = x_t at t = 0."""
    scaled = jnp.asarray(t, jnp.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / jnp.sqrt(scaled**2 + sigma_data**2)
    return c_skip, c_out


def skipping_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> jnp.ndarray:
    """LCM's DDIM grid {k - 1, 2k - 1, ..., N - 1} with k = N / n (19, 39, ..., 999 for 50 of 1000)."""
    if int(num_ddim_timesteps) != num_ddim_timesteps or not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(
            f"method.num_ddim_timesteps must be an integer in [1, {num_train_timesteps}] (the teacher's "
            f"timesteps), got {num_ddim_timesteps}"
        )
    ratio = num_train_timesteps // num_ddim_timesteps
    return jnp.arange(1, num_ddim_timesteps + 1, dtype=jnp.int32) * ratio - 1


# ------------------------------------------------------------------------------------------------ sCM


def trigflow_times(key: jax.Array, n: int, p_mean: float, p_std: float, sigma_data: float, eps: float):
    """t = arctan(exp(tau) / sigma_d), tau ~ N(p_mean, p_std), kept inside (eps, pi/2 - eps) for tan."""
    tau = p_mean + p_std * jax.random.normal(key, (n,), jnp.float32)
    return jnp.clip(jnp.arctan(jnp.exp(tau) / sigma_data), eps, jnp.pi / 2 - eps)


def scm_tangent(
    f_minus: jax.Array,
    df_minus: jax.Array,
    dxdt: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    sigma_data: float,
    warmup: jax.Array | float,
    norm_c: float = 0.1,
) -> jax.Array:
    """sCM's target direction g = -cos^2 t (sigma_d F- - dx/dt) - r (cos t sin t x_t + sigma_d dF-), normalised
    per sample g / (|g| + c) (c = 0: not normalised). ``df_minus`` is the JVP along (cos t sin t dx/dt, cos t sin t);
    r is the tangent warm-up min(1, step / H). Float32, to be used under stop-gradient."""
    cos, sin = (broadcast_to(f(t), x_t) for f in (jnp.cos, jnp.sin))
    g = -(cos**2) * (sigma_data * f_minus - dxdt) - warmup * (cos * sin * x_t + sigma_data * df_minus)
    if norm_c > 0:
        norm = jnp.sqrt(per_sample_sum(g**2))
        g = g / broadcast_to(norm + norm_c, g)
    return g


def scm_loss(
    f_theta: jax.Array, f_minus: jax.Array, g: jax.Array, t: jax.Array, logvar: jax.Array, sigma_data: float
) -> jax.Array:
    """mean[ exp(-logvar) / (sigma_d tan t) |F_theta - F- - g|^2 + logvar ] with F- and g stop-gradiented
    (the learned adaptive weighting; the prior weight 1 / (sigma_d tan t) is sCM's)."""
    target = jax.lax.stop_gradient(f_minus + g)
    sq = (f_theta.astype(jnp.float32) - target) ** 2
    weight = jnp.exp(-logvar) / (sigma_data * jnp.tan(t))
    return jnp.mean(broadcast_to(weight, sq) * sq + broadcast_to(logvar, sq))


# ------------------------------------------------------------------------------------------------ MeanFlow


def logit_normal(key: jax.Array, shape: tuple[int, ...], mean: float, std: float) -> jax.Array:
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))


def meanflow_times(
    key: jax.Array, n: int, mean: float, std: float, ratio_r_not_t: float
) -> tuple[jax.Array, jax.Array]:
    """(r, t): the sorted pair of two logit-normal draws, with r = t for a fraction 1 - ratio_r_not_t."""
    k_times, k_equal = jax.random.split(key)
    pair = logit_normal(k_times, (2, n), mean, std)
    t, r = jnp.max(pair, axis=0), jnp.min(pair, axis=0)
    equal = jax.random.uniform(k_equal, (n,)) >= ratio_r_not_t
    return jnp.where(equal, t, r), t


def meanflow_target(v: jax.Array, du_dt: jax.Array, t: jax.Array, r: jax.Array) -> jax.Array:
    """The MeanFlow identity's target u = v - (t - r) du/dt (float32, for stop-gradient use)."""
    return v.astype(jnp.float32) - broadcast_to(t - r, v) * du_dt.astype(jnp.float32)


def adaptive_loss(u: jax.Array, target: jax.Array, power: float = 1.0, eps: float = 1e-3) -> jax.Array:
    """mean over samples of sg(w) |u - sg(target)|^2 with w = 1 / (|u - target|^2 + eps)^p (per-sample sums of
    squares): MeanFlow's adaptive weighting; p = 0 is the plain squared error."""
    sq = per_sample_sum((u.astype(jnp.float32) - jax.lax.stop_gradient(target)) ** 2)
    weight = jax.lax.stop_gradient(1.0 / (sq + eps) ** power)
    return jnp.mean(weight * sq)
