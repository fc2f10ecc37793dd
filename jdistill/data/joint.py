"""Batches of several sources side by side (e.g. prompts for the generator and real images for a GAN)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jdistill.data.sources import Batch, DataSource

SEPARATOR = "/"


@dataclasses.dataclass(frozen=True)
class JointSource:
    """One batch of each part, keys prefixed ``"<part>/"`` (``split`` undoes it).

    Part i reads its own position ``position * len(parts) + i``: sources seeded alike (the world's prompt and
    image tables share the run's seed) would otherwise draw the same row numbers at every step.
    """

    parts: tuple[tuple[str, DataSource], ...]

    def local_batch(self, position: int, global_size: int, rows: np.ndarray | None = None) -> Batch:
        out = {}
        for i, (name, source) in enumerate(self.parts):
            own = position * len(self.parts) + i
            for key, value in source.local_batch(own, global_size, rows).items():
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
