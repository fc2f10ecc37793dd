"""Orbax save and restore on 8 CPU devices: device arrays vs host arrays, replicated and sharded states.

    python benchmarks/checkpoint_save.py [--leaves 900] [--sharded-mib 512]

Replicated: ``--leaves`` modules of a (64, 64) kernel and a bias (a small UNet's parameters and Adam state
have about as many leaves), each replicated over 8 fake CPU devices, handed to Orbax directly. Sharded: a
state of ``--sharded-mib`` MiB in (1024, 1024) float32 kernels split over all 8 devices, saved through
``jdistill.checkpoint.Checkpointer`` on its host path (whole-state ``jax.device_get`` first, the small-state
fast path) and on its device path (the device arrays handed to Orbax, used above ``host_copy_limit_bytes``).
Prints the time ``save`` blocks the caller, the time until the files are written, restore time, and the host
memory high-water mark each way adds. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse
import resource
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jdistill.checkpoint import Checkpointer


def replicated_state(root: str, leaves: int) -> None:
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
    tree = {f"l{i}": {"kernel": jnp.ones((64, 64)), "bias": jnp.ones((64,))} for i in range(leaves)}
    tree = jax.device_put(tree, replicated)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
    for mode in ("device arrays", "host arrays"):
        directory = os.path.join(root, mode.replace(" ", "_"))
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
        manager = ocp.CheckpointManager(directory, options=options)
        start = time.perf_counter()
        item = tree if mode == "device arrays" else jax.device_get(tree)
        manager.save(1, args=ocp.args.Composite(a=ocp.args.StandardSave(item)), force=True)
        manager.wait_until_finished()
        saved = time.perf_counter() - start
        start = time.perf_counter()
        restored = manager.restore(1, args=ocp.args.Composite(a=ocp.args.StandardRestore(abstract)))["a"]
        jax.block_until_ready(restored)
        loaded = time.perf_counter() - start
        assert restored["l0"]["kernel"].sharding == replicated
        print(f"replicated, {mode}: {2 * leaves} leaves, save {saved:.2f} s, restore {loaded:.2f} s")
        manager.close()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sharded_state(root: str, mib: int) -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    split = NamedSharding(mesh, PartitionSpec("fsdp", "data"))
    n = max(mib // 4, 1)  # 4 MiB per (1024, 1024) float32 kernel
    make = jax.jit(
        lambda: {f"l{i}": jnp.full((1024, 1024), i, jnp.float32) for i in range(n)},
        out_shardings={f"l{i}": split for i in range(n)},
    )
    items = {"net": make()}
    jax.block_until_ready(items)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), items)
    # The device path first: ru_maxrss only grows, so each row reports the high-water mark it adds.
    for mode, limit in (("device path", 0), ("host path", 1 << 62)):
        directory = os.path.join(root, mode.replace(" ", "_"))
        ckpt = Checkpointer(directory, every=1, keep=1, host_copy_limit_bytes=limit)
        rss = _rss_mib()
        start = time.perf_counter()
        ckpt.save(1, items, {"step": 1})
        blocked = time.perf_counter() - start
        ckpt.wait()
        saved = time.perf_counter() - start
        grown = _rss_mib() - rss
        ckpt.close()
        ckpt = Checkpointer(directory, every=0, keep=1)
        start = time.perf_counter()
        _, restored, _ = ckpt.restore(abstract)
        jax.block_until_ready(restored)
        loaded = time.perf_counter() - start
        ckpt.close()
        assert float(restored["net"]["l3"][5, 7]) == 3.0
        assert restored["net"]["l0"].sharding == split
        print(
            f"sharded 8 ways, {mode}: {n} leaves, {n * 4} MiB, save blocks {blocked:.2f} s, written after "
            f"{saved:.2f} s, restore {loaded:.2f} s, host high-water +{grown:.0f} MiB"
        )
        del restored


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--leaves", type=int, default=900)
    parser.add_argument("--sharded-mib", type=int, default=512)
    args = parser.parse_args()
    root = tempfile.mkdtemp()
    try:
        if args.leaves:
            replicated_state(root, args.leaves)
        if args.sharded_mib:
            sharded_state(root, args.sharded_mib)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
