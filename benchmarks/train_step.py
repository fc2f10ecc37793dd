"""Train-step throughput and compile time of a recipe, per mesh layout.

    python benchmarks/train_step.py --config configs/swiftbrush.py:gmm --steps 500
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_step.py --mesh 1x1 --mesh 8x1 --mesh 4x2

Prints one line per mesh: compile seconds (first step), steady-state steps/s and samples/s. Results go to
benchmarks/RESULTS.md with the device and date.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jdistill import configuration, parallel, train


def measure(spec: str, overrides: list[tuple[str, str]], steps: int) -> dict[str, float]:
    config = configuration.load(spec, overrides)
    s = train.setup(config, "/tmp/jdistill-bench")
    root = jax.random.key(0)
    state = train.init_train_state(s, root)
    fns = train.StepFunctions(s)
    source = s.recipe.source(s.world)
    batches = [
        parallel.global_batch(
            source.local_batch(i, config.batch_size, s.rows), s.batch_sharding, config.batch_size
        )
        for i in range(8)
    ]
    start = time.perf_counter()
    state, m = fns(0)(state, s.frozen, batches[0], np.int32(0), root)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - start
    for i in range(1, 11):  # warm-up, and compile the other update sets if any
        state, m = fns(i)(state, s.frozen, batches[i % 8], np.int32(i), root)
        jax.block_until_ready(m)
    jax.block_until_ready(m)
    start = time.perf_counter()
    sync = parallel.needs_step_sync(s.mesh)  # as the trainer does (CPU collectives)
    for i in range(11, 11 + steps):
        state, m = fns(i)(state, s.frozen, batches[i % 8], np.int32(i), root)
        if sync:
            jax.block_until_ready(m)
    jax.block_until_ready((state, m))
    elapsed = time.perf_counter() - start
    return {
        "compile_s": compile_s,
        "steps_per_s": steps / elapsed,
        "samples_per_s": steps * config.batch_size / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/swiftbrush.py:gmm")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--mesh", action="append", default=None, help="DATAxFSDP, e.g. 4x2 (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    args = parser.parse_args()
    overrides = [tuple(kv.split("=", 1)) for kv in args.set]
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    for mesh in args.mesh or [f"{jax.device_count()}x1"]:
        data, fsdp = (int(v) for v in mesh.split("x"))
        mesh_overrides = [
            ("mesh.num_devices", str(data * fsdp)),
            ("mesh.data", str(data)),
            ("mesh.fsdp", str(fsdp)),
        ]
        r = measure(args.config, [*overrides, *mesh_overrides], args.steps)
        print(
            f"{args.config} mesh {mesh}: compile {r['compile_s']:.1f} s, {r['steps_per_s']:.1f} steps/s, "
            f"{r['samples_per_s']:.0f} samples/s"
        )


if __name__ == "__main__":
    main()
