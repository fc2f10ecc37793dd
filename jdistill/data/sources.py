"""Data sources: deterministic, position-addressed batches, each host reading only its own rows.

A source returns the rows ``rows`` (global indices, ascending) of global batch number ``position``. The
trainer computes which rows this process feeds from the batch sharding. Batches are a pure function of
(seed, position), so the data position saved in a checkpoint is all a resumed run needs, and the global
batch does not depend on how many processes or devices share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class DataSource(Protocol):
    def local_batch(self, position: int, global_size: int, rows: np.ndarray) -> Batch: ...


def draw_rows(seed: int, position: int, count: int, global_size: int, rows: np.ndarray | None) -> np.ndarray:
    """Indices into a table of ``count`` items for global batch ``position``, drawn uniformly with replacement
    for the whole global batch (so every host agrees), then cut to this host's ``rows``."""
    picks = np.random.default_rng([seed, position]).integers(0, count, global_size)
    return picks if rows is None else picks[rows]


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Batches drawn by ``draw(rng, n)`` from a numpy generator seeded by (seed, position).

    Every process draws the whole global batch and keeps its rows; meant for cheap synthetic data (toy
    distributions, class labels).
    """

    draw: Callable[[np.random.Generator, int], Batch]
    seed: int = 0

    def local_batch(self, position: int, global_size: int, rows: np.ndarray | None = None) -> Batch:
        rng = np.random.default_rng([self.seed, position])
        full = self.draw(rng, global_size)
        return full if rows is None else {k: v[rows] for k, v in full.items()}
