"""``sft`` learns the Gaussian mixture's denoiser on data, on both the VP and the flow path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load

from jdistill import train
from jdistill.diffusion.schedules import FlowSchedule


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gmm", "gmm_flow"])
def test_sft_learns_the_mixture(tmp_path, preset):
    config = load(
        f"configs/sft.py:{preset}",
        [
            ("num_steps", "1500"),
            ("batch_size", "256"),
            ("progress_bar", "false"),
            ("sample.final_count", "2048"),
            ("mesh.num_devices", "1"),
        ],
    )
    results = train.train(config, str(tmp_path / preset))
    # DDIM / flow-Euler samples of the trained model, with the world's evaluator (checked in test_gmm_teacher).
    assert results["within_radius"] > 0.95
    assert results["class_consistency"] > 0.97
    assert results["min_mode_share"] > 0.08

    # The trained denoiser approximates the exact one at intermediate noise (EMA parameters).
    s, state, _ = train.restore_latest(config, str(tmp_path / preset))
    teacher = s.world.teacher
    from jdistill.methods.common import network_denoiser

    model = network_denoiser(s.recipe.networks[0], config.networks.model, teacher.schedule)
    t_mid = 0.5 if isinstance(teacher.schedule, FlowSchedule) else 500
    x0, labels = teacher.mixture.sample(np.random.default_rng(0), 2000)
    t = jnp.full((2000,), t_mid)
    x_t = teacher.schedule.add_noise(jnp.asarray(x0), jax.random.normal(jax.random.key(0), x0.shape), t)
    learned = model.predict(state["ema"]["model"], x_t, t, jnp.asarray(labels)).x0
    exact = teacher.predict({}, x_t, t, jnp.asarray(labels)).x0
    error = float(jnp.mean(jnp.linalg.norm(learned - exact, axis=-1)))
    spread = float(jnp.mean(jnp.linalg.norm(exact - exact.mean(0), axis=-1)))
    assert error < 0.1 * spread, (error, spread)
