"""Every distillation family learns: a short run of each family's gmm preset, with its own small settings, moves
the student from an untrained one to samples on the teacher's modes.

The presets' full runs (thousands of steps, 1-3 minutes each: tests/test_recipes_gmm.py, test_main.py) are
``heavy``; these checks are the default run's guard that each family's loss still trains: a few hundred steps,
half-width MLPs, run in the test process through the trainer (``train.train``: data pipeline, updates, EMA,
checkpoint and final evaluation). Quality is measured independently of jdistill's evaluation
(``helpers.gmm_quality``) on the final samples, and on the untrained student's samples from the same noise and
labels: each case asserts the untrained student fails its bar and the trained one passes it, so a family whose
loss stops training fails here.

The bars are the short runs' own, below the presets' acceptance bar (>= 0.90 within 0.5 of a mode): in a few
hundred steps the trajectory students (LCM, sCM, MeanFlow) already put most samples on modes of their class,
while the distribution-matching students reach the modes well before they sort them by class (the full presets
need thousands of steps for that)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import gmm_quality, load

from jdistill import train
from jdistill.checkpoint import Checkpointer

HALF_STUDENT = [("networks.student.model.width", "64"), ("networks.student.model.hidden", "128")]
HALF_FAKE = [("networks.fake_score.model.width", "64"), ("networks.fake_score.model.hidden", "128")]
# Faster than the presets: a higher student learning rate and a short EMA, as the run is short.
FAST_STUDENT = [("networks.student.optimizer.lr", "1e-3"), ("networks.student.ema_decay", "0.9")]


class Bar:
    """Minimum fraction within 0.5 of a mode, smallest mode share, class consistency."""

    def __init__(self, within: float, min_share: float, consistent: float):
        self.within, self.min_share, self.consistent = within, min_share, consistent

    def passes(self, quality) -> bool:
        within, shares, consistent = quality
        return within >= self.within and shares.min() >= self.min_share and consistent >= self.consistent


# family: (preset, its short settings, the bar). Measured 2026-12-05, one case after another in one test process
# on a 2-core machine shared with other jobs (load ~4.5), cold compilation cache, 108 s for all six; within 0.5 /
# min mode share / class consistency, untrained -> trained (same noise and labels), seconds:
#   swiftbrush 0.000 / 0.008 / 0.502 -> 0.504 / 0.076 / 0.814, 31 s
#   dmd2       0.000 / 0.008 / 0.502 -> 0.615 / 0.068 / 0.504, 15 s (class: the full preset's 8000 steps, heavy)
#   sid        0.000 / 0.008 / 0.502 -> 0.428 / 0.099 / 0.752, 27 s
#   lcm        0.027 / 0.027 / 0.477 -> 0.873 / 0.115 / 0.901, 13 s
#   scm        0.000 / 0.000 / 0.479 -> 0.791 / 0.108 / 0.946, 10 s
#   meanflow   0.120 / 0.013 / 0.512 -> 0.838 / 0.110 / 0.912, 11 s
# Another seed (seed 1, sample.seed 7), quiet machine, warm cache: swiftbrush -> 0.628 / 0.030 / 0.801 (19 s), dmd2
# 0.572 / 0.095 / 0.525 (9 s), sid 0.602 / 0.030 / 0.662 (18 s), lcm 0.826 / 0.103 / 0.885, scm 0.888 / 0.117 /
# 0.964, meanflow 0.791 / 0.114 / 0.927 (5-6 s each); untrained within <= 0.15. The distribution-matching bars'
# smallest mode share (0.015) catches a collapse onto a few modes, not the uneven shares of a short run.
# A student learning rate of 2e-3 collapsed the distribution-matching students (within 0.000); 600-800 steps of
# DMD2 (batch 256 or 512, CFG 3.5, fake lr 5e-3) left its class consistency at 0.50-0.53.
CASES = {
    "swiftbrush": (
        "configs/swiftbrush.py:gmm",
        [*HALF_STUDENT, *HALF_FAKE, *FAST_STUDENT, ("num_steps", "800"), ("batch_size", "256")],
        Bar(0.35, 0.015, 0.70),
    ),
    "dmd2": (
        "configs/dmd2.py:gmm",
        [*HALF_STUDENT, *HALF_FAKE, *FAST_STUDENT, ("num_steps", "500"), ("batch_size", "256")],
        Bar(0.40, 0.015, 0.0),
    ),
    "sid": (
        "configs/sid.py:gmm",
        [
            *HALF_STUDENT,
            *HALF_FAKE,
            *FAST_STUDENT,
            ("num_steps", "800"),
            ("batch_size", "256"),
            # Stronger guidance than the preset's 3 sorts the samples by class sooner (800 steps: class
            # consistency 0.75 against 0.57).
            ("method.teacher_guidance", "4.5"),
            ("method.fake_guidance", "4.5"),
        ],
        Bar(0.30, 0.015, 0.60),
    ),
    "lcm": (
        "configs/lcm.py:gmm",
        [
            *HALF_STUDENT,
            ("num_steps", "500"),
            ("batch_size", "256"),
            ("method.num_ddim_timesteps", "10"),  # a coarser grid: larger steps to learn per update
            ("networks.student.optimizer.lr", "2e-3"),
            ("networks.student.ema_decay", "0.9"),
        ],
        Bar(0.70, 0.05, 0.80),
    ),
    "scm": (
        "configs/scm.py:gmm",
        [
            *HALF_STUDENT,
            ("num_steps", "500"),
            ("batch_size", "256"),
            ("method.tangent_warmup_steps", "100"),  # the preset's 1000 scaled to the run
            ("networks.student.optimizer.lr", "2e-3"),
            ("networks.student.ema_decay", "0.9"),
        ],
        Bar(0.65, 0.05, 0.85),
    ),
    "meanflow": (
        "configs/meanflow.py:gmm",
        [
            *HALF_STUDENT,
            ("num_steps", "500"),
            ("batch_size", "256"),
            ("networks.student.optimizer.lr", "2e-3"),
            ("networks.student.ema_decay", "0.9"),
        ],
        Bar(0.70, 0.05, 0.80),
    ),
}


def _short_config(spec: str, overrides: list[tuple[str, str]]):
    steps = dict(overrides)["num_steps"]
    return load(
        spec,
        [
            *overrides,
            ("mesh.num_devices", "1"),
            ("progress_bar", "false"),
            ("log_every", steps),
            ("checkpoint.every", steps),  # one save, at the end
            ("sample.every", "0"),
            ("sample.final_count", "1024"),
            ("sample.batch", "1024"),
        ],
    )


@pytest.mark.parametrize("family", CASES)
def test_short_run_moves_the_student_onto_the_modes(family, tmp_path):
    spec, overrides, bar = CASES[family]
    config = _short_config(spec, overrides)
    workdir = str(tmp_path / "run")
    start = time.perf_counter()

    # The untrained student as the trainer initialises it, drawn from the noise and labels of the final
    # evaluation (the evaluation seed: sample.seed + 1).
    s = train.setup(config, workdir)
    checkpoints = Checkpointer(tmp_path / "no_checkpoints", every=0, keep=1)
    step, untrained, _ = train.restore_or_init(s, checkpoints)
    checkpoints.close()
    assert step == 0
    before, batch = train.draw_samples(s, untrained, config.sample.final_count, config.sample.seed + 1)

    train.train(config, workdir)
    after = np.load(tmp_path / "run/samples/final.npy")
    labels = np.load(tmp_path / "run/samples/final_labels.npy")
    np.testing.assert_array_equal(labels, batch["cond"])
    q_before, q_after = gmm_quality(before, labels), gmm_quality(after, labels)

    def shown(q):
        return f"within {q[0]:.3f}, min share {q[1].min():.3f}, class {q[2]:.3f}"

    report = f"{family}: untrained {shown(q_before)}; trained {shown(q_after)}; {time.perf_counter() - start:.0f} s"
    print(report)
    assert not bar.passes(q_before), report
    assert bar.passes(q_after), report
    assert q_after[0] - q_before[0] >= 0.3, report  # the gain itself, not only the bar
