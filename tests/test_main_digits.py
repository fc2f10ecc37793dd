"""The README's first command in full: SwiftBrush distils the shipped digits teacher on the CPU, writes a
sample grid and metrics, and exports a one-step diffusers student that diffusers' own pipeline runs.

Several minutes on 2 cores, so not in the default run: ``python -m pytest -m digits``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import REPO, logged_metrics, main_command, subprocess_env

from jdistill.digits import data
from jdistill.teachers.presets import DIGITS_CLASSIFIER

pytestmark = pytest.mark.digits


def test_readme_main_job_leaves_grid_metrics_and_a_one_step_diffusers_student(tmp_path):
    import subprocess

    import torch
    from diffusers import StableDiffusionPipeline

    from jdistill.digits.classifier import load_classifier
    from jdistill.evaluate.digits import digits_metrics

    workdir = tmp_path / "digits"
    done = subprocess.run(
        main_command(workdir, "configs/swiftbrush.py"),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "samples" / "final.png").stat().st_size > 0
    prompts = (workdir / "samples" / "final_prompts.txt").read_text().splitlines()
    assert len(prompts) == len(np.load(workdir / "samples" / "final.npy"))
    records = logged_metrics(workdir)
    final = [r for r in records if "eval/digit_accuracy" in r][-1]
    assert final["eval/digit_accuracy"] >= 0.8, final

    export = workdir / "export"
    record = json.loads((export / "jdistill_export.json").read_text())
    # The acceptance's call: one step, no CFG. The student's t = 625 and sigma_625 z input are folded into the
    # scheduler and UNet, so the pipeline's own latents (unit noise) go in.
    assert record["call"] == {"num_inference_steps": 1, "guidance_scale": 1.0}, record
    assert record["latents_scale"] == 1.0 and "unet_folded" in record, record
    pipe = StableDiffusionPipeline.from_pretrained(os.fspath(export))
    pipe.set_progress_bar_config(disable=True)
    labelled = data.evaluation_prompts(300)
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        labelled.prompts, num_inference_steps=1, guidance_scale=1.0, output_type="np", generator=generator
    ).images
    metrics = digits_metrics(load_classifier(DIGITS_CLASSIFIER), images, labelled.digits, labelled.colours)
    assert metrics["digit_accuracy"] >= 0.8, metrics

    # The README's figures for the export are what the command it names prints.
    from helpers import tool

    out = tmp_path / "eval"
    assert tool("evaluate").main(["--pipeline", os.fspath(export), "--out", os.fspath(out)]) == 0
    printed = json.loads((out / "metrics.json").read_text())["metrics"]
    stated = readme_export_figures()
    assert printed["digit_accuracy"] == pytest.approx(stated["digit_accuracy"], abs=0.01), (printed, stated)
    assert printed["colour_accuracy"] == pytest.approx(stated["colour_accuracy"], abs=0.01), (printed, stated)
    assert printed["frechet_distance"] == pytest.approx(stated["frechet_distance"], rel=0.03), (
        printed,
        stated,
    )


def readme_export_figures() -> dict[str, float]:
    """The figures the README's Quick start states for ``tools/evaluate.py --pipeline runs/digits/export``."""
    import re

    text = " ".join((REPO / "README.md").read_text().split())
    found = re.search(
        r"python tools/evaluate.py --pipeline runs/digits/export` prints digit accuracy ([\d.]+), colour accuracy "
        r"([\d.]+) and Frechet distance ([\d.]+)",
        text,
    )
    assert found, "the README no longer states what tools/evaluate.py prints for the export"
    keys = ("digit_accuracy", "colour_accuracy", "frechet_distance")
    return dict(zip(keys, map(float, found.groups()), strict=True))
