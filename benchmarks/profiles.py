"""Where a jitted step's device time goes: a ``jax.profiler`` trace of a few steps, summed per kind of op.

``profile_jax(run, out_dir, steps)`` traces ``steps`` calls of ``run`` (warm: compile before), reads the
trace's perfetto export and returns a table of device time per step by op kind (the HLO instruction names
with their numeric suffix dropped: ``fusion``, ``convolution``, ``custom-call``, ``cudnn...`` kernels), then
the longest single ops. On a GPU the events are the device's kernels; on the CPU, XLA's thunks on its worker
threads. Join an op name to the model code through the compiled HLO text (``--profile`` writes it beside the
trace): its ``metadata={op_name=... source_file=...}`` names the function behind every fusion.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from collections.abc import Callable

_SUFFIX = re.compile(r"[._]\d+$")


def _kind(name: str) -> str:
    name = name.removeprefix("end: ").removeprefix("begin: ")
    while _SUFFIX.search(name):
        name = _SUFFIX.sub("", name)
    return name


def summarize_trace(path: str, steps: int, top: int = 25) -> str:
    """The table of a perfetto trace (``perfetto_trace.json.gz``): device time per step by op kind."""
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    device = {pid for pid, name in procs.items() if "/device:" in name}

    def on_device(e) -> bool:
        if device:
            return e["pid"] in device
        name = e["name"]  # XLA's thunks, not the executor's wrappers around them nor Python's frames
        return "XLA" in threads.get((e["pid"], e["tid"]), "") and not (
            name.startswith("$") or "::" in name or "Await" in name
        )

    kinds: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    ops: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or not on_device(e):
            continue
        dur = float(e.get("dur", 0.0)) / 1e3  # microseconds -> ms
        kinds[_kind(e["name"])] += dur
        counts[_kind(e["name"])] += 1
        ops[e["name"]] += dur
    total = sum(kinds.values())
    lines = [
        f"device time {total / steps:.2f} ms per step over {steps} steps ({len(device) or 'CPU'} device lanes)"
    ]
    lines.append(f"{'op kind':60s} {'ms/step':>9s} {'share':>6s} {'calls/step':>10s}")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]:
        share = ms / total if total else 0.0
        lines.append(f"{kind[:60]:60s} {ms / steps:9.3f} {share:6.1%} {counts[kind] / steps:10.1f}")
    lines.append(f"{'longest ops':60s} {'ms/step':>9s}")
    for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{name[:60]:60s} {ms / steps:9.3f}")
    return "\n".join(lines)


def profile_jax(run: Callable[[], object], out_dir: str, steps: int = 5) -> str:
    """Trace ``steps`` calls of ``run`` into ``out_dir`` and summarize them (``run`` already compiled)."""
    import jax

    os.makedirs(out_dir, exist_ok=True)
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(steps):
            run()
    found = sorted(glob.glob(os.path.join(out_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {out_dir}: the profiler wrote no trace")
    return summarize_trace(found[-1], steps)
