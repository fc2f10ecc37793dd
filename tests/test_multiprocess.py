"""Two processes on localhost (jax.distributed, 2 CPU devices each) run the GMM recipe together."""

from __future__ import annotations

import socket
import subprocess

import numpy as np
import pytest
from helpers import (
    REPO,
    SMALL,
    SMALL_SWIFTBRUSH_NETS,
    main_command,
    max_abs_diff,
    small_swiftbrush,
    subprocess_env,
)

from jdistill import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    common = [
        *SMALL,
        *SMALL_SWIFTBRUSH_NETS,
        ("mesh.num_devices", "-1"),
        ("mesh.data", "2"),
        ("mesh.fsdp", "2"),
    ]
    workdir = tmp_path / "two"
    port = free_port()
    procs = []
    for i in range(2):
        overrides = [
            *common,
            ("distributed.coordinator_address", f"127.0.0.1:{port}"),
            ("distributed.num_processes", "2"),
            ("distributed.process_id", str(i)),
            ("distributed.initialization_timeout", "60"),
        ]
        procs.append(
            subprocess.Popen(
                main_command(workdir, overrides=overrides),
                cwd=REPO,
                env=subprocess_env(num_devices=2),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    assert "mesh {'data': 2, 'fsdp': 2} over 4 cpu devices, 2 process(es)" in outputs[0][1]

    # The same recipe in this one process on 4 of its devices gives the same parameters.
    config = small_swiftbrush(*common, ("mesh.num_devices", "4"))
    reference = str(tmp_path / "one")
    train.train(config, reference)
    _, two, step_two = train.restore_latest(config, str(workdir))
    _, one, step_one = train.restore_latest(config, reference)
    assert step_two == step_one == 6
    assert max_abs_diff(one["params"], two["params"]) < 1e-5
    assert max_abs_diff(one["opt"], two["opt"]) < 1e-5
    # Each process draws half of the final samples with its own copy of the parameters: both halves match.
    two_samples = np.load(workdir / "samples" / "final.npy")
    one_samples = np.load(tmp_path / "one" / "samples" / "final.npy")
    np.testing.assert_allclose(two_samples, one_samples, atol=1e-5)
