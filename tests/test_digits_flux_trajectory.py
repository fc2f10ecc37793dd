"""sCM and MeanFlow on the flow digits world (configs/scm.py:digits_flux, configs/meanflow.py:digits_flux):
the presets train, export to a FluxPipeline directory that diffusers loads, and tools/evaluate.py scores it.

Default run: one training step of each preset, its export drawn by diffusers' FluxPipeline, and the evaluation
tool on the shipped flow teacher (checked against the teacher's own build record). Under the ``digits``
marker (several minutes each on 2 cores): the full runs, measured through FluxPipeline on the exported student
with 300 evaluation prompts against the teacher at the same step count."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from helpers import load, run_main, tool

from jdistill.teachers.presets import DIGITS_FLUX_ROOT

SMOKE = [
    ("num_steps", 1),
    ("batch_size", 2),
    ("sample.count", 4),
    ("sample.final_count", 4),
    ("sample.batch", 4),
    ("checkpoint.every", 1),
    ("export_when_done", True),
]
PRESETS = {"scm": "configs/scm.py:digits_flux", "meanflow": "configs/meanflow.py:digits_flux"}


def build_record() -> dict:
    with open(os.path.join(DIGITS_FLUX_ROOT, "build.json")) as f:
        return json.load(f)


def flow_time(t: float) -> float:
    """TrigFlow time t -> the flow time with the same noise-to-data ratio (tan t)."""
    return math.sin(t) / (math.sin(t) + math.cos(t))


def evaluate(pipeline, out, count: int, *extra: str) -> dict:
    assert (
        tool("evaluate").main(["--pipeline", str(pipeline), "--count", str(count), "--out", str(out), *extra])
        == 0
    )
    return json.loads((out / "metrics.json").read_text())


# Each preset's brief run stays in the default run with XLA's quick compile (helpers.QUICK_COMPILE_FLAGS): a
# cold one-step meanflow run took 76 s with the default flags, 51 s with these on a busy machine.
@pytest.mark.parametrize("method", sorted(PRESETS))
def test_preset_trains_a_step_and_exports_a_flux_pipeline(tmp_path, method):
    import torch
    from diffusers import FluxPipeline

    done = run_main(tmp_path / "run", PRESETS[method], SMOKE, timeout=600, quick_compile=True)
    assert done.returncode == 0, done.stderr[-3000:]
    export = tmp_path / "run" / "export"
    record = json.loads((export / "jdistill_export.json").read_text())
    assert record["pipeline"] == "FluxPipeline" and record["method"] == method, record
    # The student's sampler in diffusers' terms: sCM one step at pi/2 (flow time 1), MeanFlow's four times.
    if method == "scm":
        assert record["call"]["num_inference_steps"] == 1 and record["student_timesteps"] == [1.0], record
    else:
        assert record["call"]["sigmas"] == [1.0, 0.75, 0.5, 0.25], record
    assert record["call"]["guidance_scale"] == 1.0 and "true_cfg_scale" not in record["call"]
    pipe = FluxPipeline.from_pretrained(str(export))
    assert (
        not pipe.transformer.config.guidance_embeds
    )  # the world's teacher has none; neither has the student
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a red 3", "a blue 7"],
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **record["call"],
    ).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_evaluate_tool_draws_the_flow_teacher_with_true_cfg(tmp_path):
    """tools/evaluate.py on the shipped FluxPipeline teacher: its default call is the build's sampler (Euler
    steps, true CFG against the empty prompt); at one step the classifier reads about the digit accuracy the
    build recorded with jdistill's own sampler (0.927 over 600 prompts; 30 here)."""
    sampler = build_record()["sampler"]
    result = evaluate(DIGITS_FLUX_ROOT + "/teacher", tmp_path / "eval", 30, "--steps", "1")
    assert result["call"] == {
        "num_inference_steps": 1,
        "guidance_scale": 1.0,
        "true_cfg_scale": sampler["guidance_scale"],
        "negative_prompt": "",
        "max_sequence_length": 16,  # the world's T5 length (FluxPipeline's default 512 pads far past it)
    }, result
    assert np.load(tmp_path / "eval" / "images.npy").shape == (30, 32, 32, 3)
    assert result["metrics"]["digit_accuracy"] >= 0.75, result


def export_at(workdir, spec: str, timesteps: tuple[float, ...], dst) -> dict:
    """The run's student exported with ``timesteps`` as its sampler (e.g. sCM's two steps)."""
    from jdistill.export import export_run

    config = load(spec, [("method.student_timesteps", repr(timesteps))])
    export_run(config, str(workdir), str(dst))
    return json.loads((dst / "jdistill_export.json").read_text())


def teacher_at(steps: int, tmp_path, count: int) -> dict:
    return evaluate(
        DIGITS_FLUX_ROOT + "/teacher", tmp_path / f"teacher_{steps}", count, "--steps", str(steps)
    )["metrics"]


@pytest.mark.digits
@pytest.mark.parametrize("method", sorted(PRESETS))
def test_full_run_through_flux_pipeline(tmp_path, method):
    """The acceptance's measurement: 300 prompts through FluxPipeline on the exported student; digit accuracy
    >= 0.9 and Frechet distance within 1.5x the teacher's at its own 28 steps, each far better than the teacher
    at the student's step count."""
    workdir = tmp_path / "run"
    done = run_main(workdir, PRESETS[method], [("export_when_done", True)], timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = build_record()["transformer"]["final"]["frechet_distance"]
    exports = {
        len(
            json.loads((workdir / "export" / "jdistill_export.json").read_text())["student_timesteps"]
        ): workdir / "export"
    }
    if method == "scm":
        record = export_at(workdir, PRESETS[method], (math.pi / 2, 1.3), tmp_path / "two")
        assert record["call"]["sigmas"] == pytest.approx([1.0, flow_time(1.3)], abs=1e-6), record
        exports[2] = tmp_path / "two"
    for steps, export in exports.items():
        student = evaluate(export, tmp_path / f"eval_{steps}", 300)["metrics"]
        teacher = teacher_at(steps, tmp_path, 300)
        assert student["digit_accuracy"] >= 0.9, (steps, student, teacher)
        assert student["frechet_distance"] <= 1.5 * reference, (steps, student, reference)
        assert student["frechet_distance"] < 0.75 * teacher["frechet_distance"], (steps, student, teacher)
