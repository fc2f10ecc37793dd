"""Every distribution-matching recipe's gmm preset, run as a user runs it, meets the Gaussian-mixture test:
>= 90% of samples within 0.5 of a mode, every mode >= 5%, >= 95% of samples on a mode of their own class.

One to three minutes per preset on a 2-core machine running two of them, so all of them are marked ``heavy``
(as is swiftbrush's, in test_main.py): ``python -m pytest -m acceptance`` runs them. The default run checks
each family with a short run of its own instead (test_family_quality.py: a few hundred steps each)."""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np
import pytest
from helpers import gmm_quality, load, run_main

from jdistill import train
from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.samplers import ode_plan, run_sampler
from jdistill.methods import build_recipe
from jdistill.methods.rollout import sampler_noise

# swiftbrush's preset is checked (with resume) in test_main.py; every preset here is ``heavy`` (60-180 s each on
# a busy 2-core machine): ``python -m pytest -m acceptance`` runs them.
PRESETS = [
    pytest.param(spec, marks=pytest.mark.heavy)
    for spec in (
        "configs/dmd.py:gmm",
        "configs/dmd2.py:gmm",
        "configs/sid.py:gmm",
        "configs/sid_lsg.py:gmm",
        "configs/sid.py:gmm_2step",
        "configs/sid.py:gmm_4step",
    )
]


@pytest.mark.acceptance
@pytest.mark.parametrize("spec", PRESETS)
def test_gmm_preset_distils_the_mixture(tmp_path, spec):
    elapsed, samples, labels = run_preset(tmp_path / "run", spec)
    within, shares, consistent = gmm_quality(samples, labels)
    config = json.loads((tmp_path / "run/config.json").read_text())
    print(
        f"{spec}: {elapsed:.0f} s, within {within:.3f}, min share {shares.min():.3f}, class {consistent:.3f}"
    )
    assert config["method"]["cfg_convention"] == "uncond"
    assert gmm_passes(samples, labels)


def run_preset(workdir, spec: str) -> tuple[float, np.ndarray, np.ndarray]:
    """Run the preset as a user does; (seconds, final samples, their labels)."""
    start = time.perf_counter()
    result = run_main(workdir, spec=spec, timeout=600)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    return elapsed, np.load(workdir / "samples/final.npy"), np.load(workdir / "samples/final_labels.npy")


def gmm_passes(samples, labels) -> bool:
    within, shares, consistent = gmm_quality(samples, labels)
    return within >= 0.90 and shares.min() >= 0.05 and consistent >= 0.95


# Trajectory students: one run each, sampled with one and two steps, and compared with the teacher's own ODE
# solution from the same noise. The distance is bounded where the sampler is deterministic from that noise (one
# step, and MeanFlow's z_r = z_t - (t - r) u); LCM's and sCM's second step starts from fresh noise (their
# samplers re-noise), so there it is reported only.
TRAJECTORY = {
    "configs/lcm.py:gmm": ((999.0,), (999.0, 499.0)),
    "configs/lcm.py:gmm_flow": ((1.0,), (1.0, 0.5)),  # LCM's flow variant on the rf teacher
    "configs/scm.py:gmm": ((math.pi / 2,), (math.pi / 2, 1.1)),
    "configs/meanflow.py:gmm": ((1.0,), (1.0, 0.5)),
}


def teacher_ode_samples(config, world, z, labels):
    """The analytic teacher's probability-flow ODE from ``z`` (200 first-order steps on the path the student
    samples, with the guidance it was distilled with)."""
    m = config.method
    schedule = world.teacher.schedule
    scale = m.get("sample_guidance", m.get("guidance_scale"))
    plan = ode_plan(schedule, 200, spacing="trailing")

    def denoise(x, t):
        return predict_cfg(world.teacher, {}, x, t, labels, world.uncond, scale, m.cfg_convention)

    return run_sampler(denoise, z, plan)


@pytest.mark.acceptance
@pytest.mark.heavy  # scm's (about 90 s cold) too: test_family_quality.py covers sCM in the default run
@pytest.mark.parametrize("spec", TRAJECTORY)
def test_trajectory_preset_distils_the_mixture_in_one_and_two_steps(tmp_path, spec):
    elapsed, samples, labels = run_preset(tmp_path / "run", spec)
    assert gmm_passes(samples, labels), gmm_quality(samples, labels)

    config = load(spec)
    s, state, _ = train.restore_latest(config, str(tmp_path / "run"))
    params = train.sampling_params(s, state)
    labels = (np.arange(4096) % 2).astype(np.int32)
    key = jax.random.key(42)
    path = s.world.teacher.schedule  # these presets put the analytic teacher on the student's path
    report = [f"{spec}: {elapsed:.0f} s"]
    for steps in TRAJECTORY[spec]:
        recipe = build_recipe(load(spec, [("method.student_timesteps", repr(steps))]), s.world)
        student = np.asarray(jax.jit(recipe.sample)(params, labels, key))
        z, _ = sampler_noise(key, path, student.shape)  # the noise the student's sampler started from
        reference = np.asarray(teacher_ode_samples(config, s.world, z, labels))
        distance = float(np.mean(np.linalg.norm(student - reference, axis=1)))
        within, shares, consistent = gmm_quality(student, labels)
        report.append(
            f"{len(steps)} step(s): within {within:.3f}, min share {shares.min():.3f}, class {consistent:.3f}, "
            f"mean distance to the teacher's ODE {distance:.3f}"
        )
        assert gmm_passes(student, labels), report
        if len(steps) == 1 or config.method.name == "meanflow":
            assert distance < 0.25, report  # measured 0.12-0.13 (1 step), 0.06 (MeanFlow, 2 steps)
    print("; ".join(report))
