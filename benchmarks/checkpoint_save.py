"""Orbax save and restore of a replicated train-state-like tree on 8 CPU devices: device arrays vs host arrays.

    python benchmarks/checkpoint_save.py [--leaves 900]

``--leaves`` modules of a (64, 64) kernel and a bias (a small UNet's parameters and Adam state have about as
many leaves), each replicated over 8 fake CPU devices. Prints save and restore seconds for both ways of
handing the tree to Orbax; ``jdistill.checkpoint`` hands host arrays in single-process runs. Results go to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--leaves", type=int, default=900)
    args = parser.parse_args()
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
    tree = {f"l{i}": {"kernel": jnp.ones((64, 64)), "bias": jnp.ones((64,))} for i in range(args.leaves)}
    tree = jax.device_put(tree, replicated)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
    root = tempfile.mkdtemp()
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
        print(f"{mode}: {2 * args.leaves} leaves, save {saved:.2f} s, restore {loaded:.2f} s")
        manager.close()
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
