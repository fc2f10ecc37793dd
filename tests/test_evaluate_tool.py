"""tools/evaluate.py: digits metrics of images given with their prompts, and of a diffusers pipeline's samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tool

from jdistill.digits import data
from jdistill.teachers.presets import DIGITS_TEACHER


def _real_with_prompts(tmp_path, n=120):
    prompts = data.evaluation_prompts(n)
    index = [np.flatnonzero(data.digit_labels() == d)[i] for i, d in enumerate(prompts.digits)]
    images = data.render(index, prompts.colours)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts.prompts) + "\n")
    return prompts


def test_real_images_score_high_and_wrong_prompts_low(tmp_path):
    evaluate = tool("evaluate")
    prompts = _real_with_prompts(tmp_path)
    out = tmp_path / "eval"
    assert (
        evaluate.main(
            [
                "--images",
                str(tmp_path / "images.npy"),
                "--prompts",
                str(tmp_path / "prompts.txt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["digit_accuracy"] >= 0.95 and metrics["colour_accuracy"] >= 0.99, metrics
    assert (out / "grid.png").exists() and np.load(out / "images.npy").shape == (120, 32, 32, 3)

    # The same images against prompts naming the next digit: digit accuracy collapses, colour stays.
    shifted = [
        data.caption((d + 1) % 10, c, 0, False) for d, c in zip(prompts.digits, prompts.colours, strict=True)
    ]
    (tmp_path / "shifted.txt").write_text("\n".join(shifted) + "\n")
    evaluate.main(
        [
            "--images",
            str(tmp_path / "images.npy"),
            "--prompts",
            str(tmp_path / "shifted.txt"),
            "--out",
            str(out),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["digit_accuracy"] < 0.1 and metrics["colour_accuracy"] >= 0.99, metrics


def test_bad_input_is_named(tmp_path, capsys):
    evaluate = tool("evaluate")
    _real_with_prompts(tmp_path, n=12)
    (tmp_path / "short.txt").write_text("a red seven\n")
    with pytest.raises(SystemExit):
        evaluate.main(["--images", str(tmp_path / "images.npy"), "--prompts", str(tmp_path / "short.txt")])
    assert "12 images but 1 prompts" in capsys.readouterr().err
    (tmp_path / "cats.txt").write_text("a cat\n" * 12)
    with pytest.raises(SystemExit):
        evaluate.main(["--images", str(tmp_path / "images.npy"), "--prompts", str(tmp_path / "cats.txt")])
    assert "nothing to measure" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--pipeline", str(tmp_path)])
    assert "no model_index.json" in capsys.readouterr().err


def test_pipeline_samples_are_drawn_by_diffusers_with_the_teachers_call(tmp_path):
    evaluate = tool("evaluate")
    assert evaluate.pipeline_call(DIGITS_TEACHER)["num_inference_steps"] == 50
    out = tmp_path / "eval"
    evaluate.main(["--pipeline", DIGITS_TEACHER, "--steps", "8", "--count", "60", "--out", str(out)])
    record = json.loads((out / "metrics.json").read_text())
    assert record["call"]["num_inference_steps"] == 8
    # 8 DDIM steps of the shipped teacher already draw mostly readable digits (50 steps: 0.998).
    assert record["metrics"]["digit_accuracy"] >= 0.7, record
