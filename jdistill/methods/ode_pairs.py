"""Generating teacher ODE pairs: the teacher's deterministic sampler, with the recipe's guidance, from noise."""

from __future__ import annotations

import jax
import numpy as np

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.samplers import ode_plan, run_sampler


def generate_ode_pairs(
    world,
    *,
    count: int,
    guidance_scale: float,
    cfg_convention: str,
    steps: int = 50,
    batch: int = 256,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``count`` pairs: the condition inputs of the world's training source, ``z`` and the teacher's ``x0``.

    Conditions are drawn at source positions far from those training reads (1e6 onwards).
    """
    schedule = world.teacher.schedule
    plan = ode_plan(schedule, steps)

    @jax.jit
    def sample(frozen, host_batch, key):
        cond = world.prepare(frozen, host_batch)["cond"]
        n = jax.tree.leaves(cond)[0].shape[0]
        z = schedule.prior_sample(key, (n, *world.sample_shape))

        def denoise(x, t):
            return predict_cfg(
                world.teacher, frozen["teacher"], x, t, cond, world.uncond, guidance_scale, cfg_convention
            )

        return z, run_sampler(denoise, z, plan)

    chunks: dict[str, list[np.ndarray]] = {}
    key = jax.random.key(seed)
    batch = min(batch, count)
    for i, _ in enumerate(range(0, count, batch)):
        host_batch = world.conditions.local_batch(1_000_000 + i, batch)
        z, x0 = sample(world.frozen, host_batch, jax.random.fold_in(key, i))
        for k, v in {**host_batch, "z": z, "x0": x0}.items():
            chunks.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v)[:count] for k, v in chunks.items()}
