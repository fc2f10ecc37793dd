"""The trainer's warning about samples that losses left out for non-finite values (jdistill/nonfinite.py)."""

from __future__ import annotations

import json
import logging

from helpers import small_swiftbrush

from jdistill import train
from jdistill.nonfinite import nonfinite_rows, warn_nonfinite_rows


def test_warns_once_for_the_updates_that_left_samples_out(caplog):
    values = {
        "generator/loss": 0.3,
        "generator/nonfinite_rows": 1.5,
        "fake_score/nonfinite_rows": 0.0,
        "discriminator/nonfinite_rows": 2.0,
        "steps_per_sec": 3.0,
    }
    assert nonfinite_rows(values) == {"generator": 1.5, "discriminator": 2.0}
    with caplog.at_level(logging.WARNING, logger="jdistill"):
        line = warn_nonfinite_rows(values, step=40)
    assert [r.getMessage() for r in caplog.records] == [line]
    assert (
        line.startswith("step 40: non-finite samples left out") and "discriminator 2, generator 1.5" in line
    )


def test_silent_without_left_out_samples(caplog):
    with caplog.at_level(logging.WARNING, logger="jdistill"):
        assert warn_nonfinite_rows({"generator/nonfinite_rows": 0.0, "generator/loss": 1.0}, step=2) is None
    assert not caplog.records


def test_the_metrics_log_carries_the_counts(tmp_path):
    """Two steps of swiftbrush:gmm: every logged step has both updates' counts (zero: nothing left out)."""
    config = small_swiftbrush(("num_steps", "2"), ("log_every", "1"), ("checkpoint.every", "0"))
    train.train(config, str(tmp_path))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "generator/loss" in entry]
    assert [e["step"] for e in steps] == [1, 2]
    for entry in steps:
        assert entry["generator/nonfinite_rows"] == 0.0 and entry["fake_score/nonfinite_rows"] == 0.0
        assert nonfinite_rows(entry) == {}
