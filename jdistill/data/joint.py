"""Batches of several sources side by side (e.g. prompts for the generator and real images for a GAN)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jdistill.data.sources import Batch, DataSource

SEPARATOR = "/"


@dataclasses.dataclass(frozen=True)
class JointSource:
    """Each part's batch at the same position, its keys prefixed ``"<part>/"``; ``split`` undoes it."""

    parts: tuple[tuple[str, DataSource], ...]

    def local_batch(self, position: int, global_size: int, rows: np.ndarray | None = None) -> Batch:
        out = {}
        for name, source in self.parts:
            for key, value in source.local_batch(position, global_size, rows).items():
                out[f"{name}{SEPARATOR}{key}"] = value
        return out


def split(batch: dict) -> dict[str, dict]:
    """``{"a/x": .., "b/y": ..}`` -> ``{"a": {"x": ..}, "b": {"y": ..}}``."""
    parts: dict[str, dict] = {}
    for key, value in batch.items():
        name, sep, rest = key.partition(SEPARATOR)
        if not sep:
            raise ValueError(f"batch key {key!r} of a joint source has no part prefix")
        parts.setdefault(name, {})[rest] = value
    return parts
