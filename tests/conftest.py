"""Test configuration: 8 fake CPU devices and a persistent compilation cache.

The device count must be set before JAX initialises its backend, so this runs at import time, ahead of
every test module.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# Collectives of fake CPU devices can deadlock: a guidance-distilled FLUX step under fsdp=2 on 8 devices (the
# all-gathers of its scanned stacks inside while loops) stopped in a rendezvous the last devices never reached,
# in 4 of 4 runs. XLA:CPU's concurrency-optimised HLO scheduler off: every run since passed. (More threads,
# PJRT_NPROC=16, made it rarer but changed the results of thread-split reductions enough to flip the scm gmm
# preset's quality check; benchmarks/cpu_collective_loop.py probes the deadlock.)
if "--xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

# The test process compiles hundreds of small programs and runs each a few times: XLA:CPU without LLVM's
# optimisations compiles them in 30-45% less time (tests/test_flux.py: 7.4 s -> 5.1 s for the float64 JVP
# check). Results differ from the optimised code's by rounding only. Subprocess runs of the entry point
# (helpers.subprocess_env) keep the default flags unless a test asks for a quick compile.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

import jax

# JAX_COMPILATION_CACHE_DIR (JAX's own variable) points a run elsewhere, e.g. an empty folder to time a cold CI run.
CACHE_DIR = (
    os.environ.get("JAX_COMPILATION_CACHE_DIR")
    or pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
)
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Tiny random SD- and SDXL-like diffusers pipelines saved to disk, and a prompt file (built once)."""
    import tiny_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\nthe digit 3\na blue square on a green field\n")
    return {
        "sd": tiny_pipeline.save_sd_pipeline(root / "sd"),
        "sdxl": tiny_pipeline.save_sdxl_pipeline(root / "sdxl"),
        "prompts": prompts,
    }


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> pathlib.Path:
    """Eight small captioned images in the imagefolder layout (metadata.jsonl), for ``teacher.data``."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root / "metadata.jsonl"
