"""The distribution-matching presets on the flow digits world (configs/sid.py:digits_flux, four-step SiD-DiT;
configs/dmd2.py:digits_flux, one-step DMD2): each runs a step, exports a FluxPipeline directory
and that directory samples through diffusers' own FluxPipeline with the export's recorded call. In full
(``python -m pytest -m digits``, minutes each on 2 cores) the exported student, sampled by FluxPipeline on
300 evaluation prompts and scored by the world's classifier, must read the prompt's digit and land near
the teacher's image distribution, far better than the teacher at the same step count (build.json)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import logged_metrics, run_main

from jdistill.teachers.presets import DIGITS_FLUX_ROOT, DIGITS_FLUX_TEACHER

PRESETS = {"sid": "configs/sid.py:digits_flux", "dmd2": "configs/dmd2.py:digits_flux"}
# "far better than the teacher at the same step count": the student's Frechet distance below this fraction of
# the teacher's (measured 2026-12-05 through FluxPipeline, 300 prompts: teacher at 1 step 794, at 4 steps 481).
FAR_BETTER = 0.8
BRIEF = (
    ("num_steps", "1"),  # one program: a second step would compile dmd2's other set of updates
    ("batch_size", "2"),
    ("log_every", "1"),
    ("checkpoint.every", "1"),
    ("sample.count", "2"),
    ("sample.final_count", "4"),
    ("sample.batch", "4"),
    ("export_when_done", "True"),
)


def _export_record(export) -> dict:
    with open(os.path.join(export, "jdistill_export.json")) as f:
        return json.load(f)


def _teacher_images(prompts: list[str], steps: int, guidance: float, batch: int = 100) -> np.ndarray:
    """The shipped teacher through FluxPipeline at ``steps`` Euler steps with true CFG ``guidance`` against
    the empty prompt (its build's sampler at another step count), as [0, 1] float images."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(DIGITS_FLUX_TEACHER)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        images = pipe(
            chunk,
            negative_prompt=[""] * len(chunk),
            true_cfg_scale=guidance,
            num_inference_steps=steps,
            height=32,
            width=32,
            max_sequence_length=16,
            output_type="np",
            generator=generator,
        ).images
        out.append(np.asarray(images, np.float32))
    return np.concatenate(out)


def _pipeline_images(export, prompts: list[str], call: dict, seed: int = 0, batch: int = 100) -> np.ndarray:
    """``prompts`` drawn by diffusers' FluxPipeline from the exported directory with the recorded call, as
    [0, 1] float images."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(os.fspath(export))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # FluxPipeline's scheduler.step draws a stochastic student's re-noise globally
    out = []
    for start in range(0, len(prompts), batch):
        images = pipe(
            prompts[start : start + batch], height=32, width=32, output_type="np", generator=generator, **call
        ).images
        out.append(np.asarray(images, np.float32))
    return np.concatenate(out)


# One step with XLA's quick compile (helpers.QUICK_COMPILE_FLAGS), in the default run: measured 2026-12-05 on a busy
# 2-core machine, dmd2 58 s and sid 72 s (two steps with the default flags: dmd2 107 s).
@pytest.mark.parametrize("recipe", ["dmd2", "sid"])
def test_preset_runs_briefly_and_exports_a_flux_pipeline(recipe, tmp_path):
    workdir = tmp_path / recipe
    done = run_main(workdir, PRESETS[recipe], BRIEF, timeout=600, quick_compile=True)
    assert done.returncode == 0, done.stderr[-3000:]
    records = logged_metrics(workdir)
    final = [r for r in records if "eval/digit_accuracy" in r][-1]
    assert np.isfinite(final["eval/frechet_distance"]), final
    record = _export_record(workdir / "export")
    call = record["call"]
    if recipe == "dmd2":  # one step from pure noise: the plain Euler step of the shift-1 scheduler
        assert call == {"num_inference_steps": 1, "guidance_scale": 1.0, "max_sequence_length": 16}, call
    else:  # four steps at SiD-DiT's times, fresh noise between them
        assert call["sigmas"] == pytest.approx([1.0, 0.75, 0.5, 0.25]), call
    from jdistill.digits import data

    images = _pipeline_images(workdir / "export", list(data.evaluation_prompts(2).prompts), call)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.digits
@pytest.mark.parametrize("recipe", sorted(PRESETS))
def test_full_run_exported_student_matches_the_teacher_through_flux_pipeline(recipe, tmp_path):
    from jdistill.digits import data
    from jdistill.digits.classifier import load_classifier
    from jdistill.evaluate.digits import digits_metrics
    from jdistill.teachers.presets import DIGITS_CLASSIFIER

    workdir = tmp_path / recipe
    done = run_main(workdir, PRESETS[recipe], (("export_when_done", "True"),), timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    call = _export_record(workdir / "export")["call"]
    labelled = data.evaluation_prompts(300)
    images = _pipeline_images(workdir / "export", list(labelled.prompts), call)
    classifier = load_classifier(DIGITS_CLASSIFIER)
    got = digits_metrics(classifier, images, labelled.digits, labelled.colours)
    with open(os.path.join(DIGITS_FLUX_ROOT, "build.json")) as f:
        build = json.load(f)
    # The acceptance: the prompt's digit, and within 1.5x the teacher's Frechet distance at its own sampler
    # (build.json); and better than the teacher's own pipeline at the student's step count.
    assert got["digit_accuracy"] >= 0.9, got
    assert got["frechet_distance"] <= 1.5 * build["transformer"]["final"]["frechet_distance"], got
    steps = call.get("num_inference_steps") or len(call["sigmas"])
    teacher_images = _teacher_images(list(labelled.prompts), steps, build["sampler"]["guidance_scale"])
    teacher = digits_metrics(classifier, teacher_images, labelled.digits, labelled.colours)
    assert got["frechet_distance"] < FAR_BETTER * teacher["frechet_distance"], (got, teacher)
