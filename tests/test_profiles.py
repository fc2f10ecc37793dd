"""benchmarks/profiles.py: device time per op kind from a perfetto trace (synthetic traces with known sums)."""

from __future__ import annotations

import gzip
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from profiles import summarize_trace


def _write(tmp_path, events):
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(path)


def _meta(kind, pid, name, tid=0):
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def _op(pid, name, us, tid=0):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": 0.0, "dur": us, "name": name}


def _rows(table: str) -> dict[str, float]:
    rows = {}
    for line in table.splitlines()[2:]:
        if line.startswith("longest ops"):
            break
        name, ms = line[:60].strip(), float(line[60:].split()[0])
        rows[name] = ms
    return rows


def test_gpu_trace_sums_device_kernels_per_step_by_kind(tmp_path):
    events = [
        _meta("process_name", 1, "/host:CPU"),
        _meta("process_name", 2, "/device:GPU:0"),
        _op(1, "fusion.3", 9000.0),  # host side: not device time
        _op(2, "fusion.3", 1000.0),
        _op(2, "fusion.17", 3000.0),
        _op(2, "convolution.2", 2000.0),
        _op(2, "cudnn_fmha_fwd_1", 500.0),
    ]
    table = summarize_trace(_write(tmp_path, events), steps=2)
    assert table.splitlines()[0].startswith("device time 3.25 ms per step")
    assert _rows(table) == {"fusion": 2.0, "convolution": 1.0, "cudnn_fmha_fwd": 0.25}


def test_cpu_trace_keeps_xla_thunks_only(tmp_path):
    events = [
        _meta("process_name", 1, "/host:CPU"),
        _meta("thread_name", 1, "tf_XLAEigen/1", tid=5),
        _meta("thread_name", 1, "python", tid=6),
        _op(1, "ynn_fusion.70", 4000.0, tid=5),
        _op(1, "ThunkExecutor::Execute", 9000.0, tid=5),  # a wrapper around the thunks
        _op(1, "$builtins isinstance", 10.0, tid=5),
        _op(1, "transpose_copy_fusion.1", 1000.0, tid=6),  # not an XLA thread
    ]
    assert _rows(summarize_trace(_write(tmp_path, events), steps=1)) == {"ynn_fusion": 4.0}
