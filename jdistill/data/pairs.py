"""Teacher ODE pairs (noise, conditioning, teacher output) for DMD's regression loss.

Stored as a directory of ``.npy`` files, one per batch key, all with the same first dimension, read with
memory mapping so that a large pair set is not loaded whole (``tools/make_ode_pairs.py`` writes them); or
held in memory for small teachers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

MANIFEST = "pairs.json"


def write_pairs(path: str, arrays: Mapping[str, np.ndarray], info: dict) -> None:
    count = _count(arrays)
    os.makedirs(path, exist_ok=True)
    for key, value in arrays.items():
        np.save(os.path.join(path, f"{key}.npy"), value)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({"keys": sorted(arrays), "count": count, **info}, f, indent=2)


def _count(arrays: Mapping[str, np.ndarray]) -> int:
    sizes = {k: len(v) for k, v in arrays.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"pair arrays must be non-empty and equally long: {sizes}")
    return next(iter(sizes.values()))


class PairsSource:
    """Batches of pairs drawn uniformly with replacement, a pure function of (seed, position)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], seed: int = 0):
        self.arrays = dict(arrays)
        self.count = _count(self.arrays)
        self.seed = seed

    @classmethod
    def from_dir(cls, path: str, seed: int = 0) -> PairsSource:
        manifest = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest):
            raise FileNotFoundError(
                f"{path} holds no ODE pairs ({MANIFEST} missing); make them with tools/make_ode_pairs.py"
            )
        with open(manifest) as f:
            keys = json.load(f)["keys"]
        return cls({k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r") for k in keys}, seed)

    def local_batch(
        self, position: int, global_size: int, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        picks = np.random.default_rng([self.seed, position]).integers(0, self.count, global_size)
        if rows is not None:
            picks = picks[rows]
        order = np.argsort(
            picks, kind="stable"
        )  # memory-mapped reads in file order, then back to batch order
        inverse = np.argsort(order, kind="stable")
        return {k: np.asarray(v[picks[order]])[inverse] for k, v in self.arrays.items()}
