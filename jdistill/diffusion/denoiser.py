"""The denoiser interface every method talks to.

A denoiser maps (params, x_t, t, cond) to a ``Prediction`` (x0, eps, and from them v, velocity and the
score), in float32, with t in its schedule's own units. Teachers (analytic or converted networks), students
and fake scores all implement it, so a loss never sees a raw network output or a timestep convention.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jdistill.diffusion.guidance import CFG_CONVENTIONS, guided_predict
from jdistill.diffusion.parameterization import PREDICTION_TYPES, Prediction, to_prediction
from jdistill.diffusion.schedules import Schedule
from jdistill.models.net import Net

PyTree = Any


class Denoiser(Protocol):
    schedule: Schedule

    def predict(self, params: PyTree, x_t: jax.Array, t: jax.Array, cond: PyTree) -> Prediction: ...


def predict_cfg(
    denoiser: Denoiser,
    params: PyTree,
    x_t: jax.Array,
    t: jax.Array,
    cond: PyTree,
    uncond: PyTree,
    scale: float | jax.Array | None,
    convention: str = "uncond",
) -> Prediction:
    """``denoiser.predict`` with classifier-free guidance (one batched pass for cond and uncond); a
    guidance-distilled teacher (``embedded_guidance``) takes the scale as an input in one pass instead."""
    if getattr(denoiser, "embedded_guidance", False):
        return denoiser.predict(params, x_t, t, with_guidance_input(cond, scale, convention, x_t.shape[0]))
    return guided_predict(
        lambda x, s, c: denoiser.predict(params, x, s, c), x_t, t, cond, uncond, scale, convention
    )


def with_guidance_input(cond: dict, scale: float | jax.Array | None, convention: str, batch: int) -> dict:
    """``cond`` with the guidance-embedding input that stands for CFG at ``scale`` under ``convention``
    (y_u + w (y_c - y_u): w; y_c + w (y_c - y_u): w + 1; no guidance: 1)."""
    if convention not in CFG_CONVENTIONS:
        raise ValueError(f"unknown CFG convention {convention!r}; choose one of {CFG_CONVENTIONS}")
    w = 1.0 if scale is None else jnp.asarray(scale, jnp.float32) + (1.0 if convention == "cond" else 0.0)
    return {**cond, "guidance": jnp.broadcast_to(jnp.asarray(w, jnp.float32), (batch,))}


@dataclasses.dataclass(frozen=True, eq=False)
class NetworkDenoiser:
    """A network whose output is one parameterization of the denoiser on ``schedule``."""

    net: Net
    prediction: str
    schedule: Schedule

    def __post_init__(self):
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction!r}; choose one of {PREDICTION_TYPES}")

    def predict(self, params: PyTree, x_t: jax.Array, t: jax.Array, cond: PyTree) -> Prediction:
        out = self.net.apply(params, x_t, self.schedule.model_time(t), cond)
        return to_prediction(out, self.prediction, x_t, self.schedule, t)
