"""The entry point as a user runs it: the shipped default, resume, signals, other modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import (
    REPO,
    SMALL,
    SMALL_SWIFTBRUSH_NETS,
    gmm_quality,
    logged_metrics,
    main_command,
    max_abs_diff,
    run_main,
    small_swiftbrush,
    subprocess_env,
)

from jdistill import train

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "samples/final.npy", "samples/final_labels.npy")


def train_steps(logged: list[dict]) -> list[int]:
    """The steps of the training records (not the evaluations')."""
    return [e["step"] for e in logged if not any(k.startswith("eval/") for k in e)]


def check_finished_run(workdir) -> list[dict]:
    """A finished swiftbrush run's files are there; returns its metrics, each record with a step and the first
    with the recipe's losses."""
    for name in RUN_FILES:
        assert (workdir / name).exists(), name
    logged = logged_metrics(workdir)
    assert all("step" in entry for entry in logged)
    assert any("swiftbrush" not in k and k.endswith("/loss") for k in logged[0])
    return logged


def check_rerun_redid_nothing(
    second: subprocess.CompletedProcess, workdir, logged: list[dict], step: int
) -> None:
    """The second run of a finished run resumed at its last step and logged no training step again."""
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from checkpoint at step {step}" in second.stderr
    assert train_steps(logged_metrics(workdir)) == train_steps(logged)


# The gmm preset in full (8000 steps, about 100 s alone on 2 cores, more with a second worker): ``heavy`` like the
# other presets' full runs (``-m acceptance`` runs them); the default run checks swiftbrush's training briefly
# (test_family_quality.py) and the rerun of a finished run below.
@pytest.mark.slow
@pytest.mark.acceptance
@pytest.mark.heavy
def test_default_recipe_distils_the_mixture_and_resumes(tmp_path):
    workdir = tmp_path / "gmm"
    start = time.perf_counter()
    first = run_main(workdir, timeout=600)
    elapsed = time.perf_counter() - start
    assert first.returncode == 0, first.stderr[-3000:]
    logged = check_finished_run(workdir)
    config = json.loads((workdir / "config.json").read_text())
    assert config["method"]["name"] == "swiftbrush"
    samples = np.load(workdir / "samples/final.npy")
    labels = np.load(workdir / "samples/final_labels.npy")
    assert samples.shape[0] >= 4096 and samples.shape[1] == 2 and labels.shape == samples.shape[:1]
    within, shares, consistent = gmm_quality(samples, labels)
    print(
        f"default gmm run: {elapsed:.0f} s, within {within:.3f}, min share {shares.min():.3f}, class {consistent:.3f}"
    )
    assert within >= 0.90
    assert shares.min() >= 0.05
    assert consistent >= 0.95

    check_rerun_redid_nothing(run_main(workdir, timeout=300), workdir, logged, config["num_steps"])


@pytest.mark.slow
def test_rerun_of_a_finished_run_redoes_nothing(tmp_path):
    """The entry point run twice with the same command: the second resumes at the last step and logs no
    training step again."""
    workdir = tmp_path / "run"
    overrides = [*SMALL, *SMALL_SWIFTBRUSH_NETS]
    first = run_main(workdir, overrides=overrides, quick_compile=True)
    assert first.returncode == 0, first.stderr[-3000:]
    logged = check_finished_run(workdir)

    check_rerun_redid_nothing(run_main(workdir, overrides=overrides, quick_compile=True), workdir, logged, 6)
    assert train_steps(logged_metrics(workdir))[-1] == 6


SIGNAL_RUN = [
    *SMALL,
    *SMALL_SWIFTBRUSH_NETS,
    ("num_steps", "300"),
    ("log_every", "1"),
    ("checkpoint.every", "1000"),
]


def _wait_for_step(workdir, step, proc, timeout=180):
    deadline = time.time() + timeout
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"run did not reach step {step}")


def _interrupt(workdir, overrides, at_step: int, sig: int) -> tuple[int, str]:
    """Start a run, send ``sig`` once it has logged ``at_step``; returns (exit status, stderr)."""
    proc = subprocess.Popen(
        main_command(workdir, overrides=overrides),
        cwd=REPO,
        env=subprocess_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_step(workdir, at_step, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_exact(tmp_path):
    straight = tmp_path / "straight"
    assert run_main(straight, overrides=SIGNAL_RUN).returncode == 0
    stopped = tmp_path / "stopped"
    returncode, err = _interrupt(stopped, SIGNAL_RUN, 30, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, err[-3000:]
    saved = sorted(int(d) for d in os.listdir(stopped / "checkpoints") if d.isdigit())
    assert len(saved) == 1 and 30 <= saved[0] < 300  # saved where it stopped, not at the end
    resumed = run_main(stopped, overrides=SIGNAL_RUN)
    assert resumed.returncode == 0
    assert f"resumed from checkpoint at step {saved[0]}" in resumed.stderr
    config = small_swiftbrush(*SIGNAL_RUN)
    _, a, step_a = train.restore_latest(config, str(straight))
    _, b, step_b = train.restore_latest(config, str(stopped))
    assert step_a == step_b == 300
    assert max_abs_diff(a["params"], b["params"]) == 0.0
    assert max_abs_diff(a["opt"], b["opt"]) == 0.0


@pytest.mark.slow
def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path):
    overrides = [*SIGNAL_RUN, ("checkpoint.every", "25")]
    workdir = tmp_path / "killed"
    _interrupt(workdir, overrides, 60, signal.SIGKILL)
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps and steps[-1] >= 25
    resumed = run_main(workdir, overrides=overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint at step" in resumed.stderr
    assert (workdir / "samples" / "final.npy").exists()


@pytest.mark.slow
def test_sample_eval_export_modes(tmp_path):
    overrides = [*SMALL, *SMALL_SWIFTBRUSH_NETS]
    workdir = tmp_path / "run"
    assert run_main(workdir, overrides=overrides).returncode == 0
    for mode in ("sample", "eval", "export"):
        result = run_main(workdir, overrides=overrides, flags=[f"--mode={mode}"])
        assert result.returncode == 0, (mode, result.stderr[-3000:])
    assert (workdir / "samples" / "sample_step0000006.npy").exists()
    from safetensors.numpy import load_file

    exported = load_file(workdir / "export" / "student.safetensors")
    assert "out.kernel" in exported and exported["out.kernel"].shape == (32, 2)
    no_ckpt = run_main(tmp_path / "nothing", overrides=overrides, flags=["--mode=sample"], timeout=120)
    assert no_ckpt.returncode != 0 and "no checkpoint" in no_ckpt.stderr
