"""The input pipeline: batches prepared in worker threads ahead of the step and put on the devices ahead of use.

A source's batch is a pure function of its position (``sources.py``), so the pipeline is grain's
``MapDataset.range(start, stop).map(read)``: worker threads (``data.workers``) read, decode, resize and
tokenize up to ``data.prefetch`` positions ahead, in any order, and hand them out in position order; a
transfer thread turns each host batch into a global device batch (``parallel.global_batch``) up to
``data.device_prefetch`` batches ahead, so the host-to-device copy of the next batch overlaps the current step.

The pipeline's whole state is the next position it hands out (``BatchPipeline.position``): the trainer saves
it in the checkpoint's metadata and a resumed run starts its pipeline there, so it sees exactly the batches an
uninterrupted run would have seen, whatever was read ahead when the run stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jdistill import parallel
from jdistill.data.sources import Batch, DataSource

# grain (about 0.3 s to import) is imported where a pipeline is built: validating a config needs only the options.

KEYS = ("workers", "prefetch", "device_prefetch")


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """``workers``: threads preparing batches (0: each batch is read in the consumer's thread when it is
    asked for, nothing ahead); ``prefetch``: host batches prepared ahead (at least ``workers``, or threads
    sit idle); ``device_prefetch``: global batches waiting on the devices ahead of the one in use, one more
    may be in transfer (0: put in the consumer's thread when asked for)."""

    workers: int = 4
    prefetch: int = 4
    device_prefetch: int = 2

    def __post_init__(self):
        for key in KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data.{key} must be a non-negative integer, got {value!r}")
        if self.workers and self.prefetch < self.workers:
            raise ValueError(
                f"data.prefetch={self.prefetch} is below data.workers={self.workers}: at most data.prefetch "
                "batches are prepared at once, so the other workers would sit idle; raise data.prefetch"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PipelineOptions:
        """The ``data`` section of a run config (a run config written before the section: the defaults)."""
        section = config.get("data") or {}
        return cls(**{k: section[k] for k in KEYS if k in section})


def host_dataset(
    source: DataSource,
    start: int,
    stop: int,
    global_size: int,
    rows: np.ndarray | None,
    options: PipelineOptions,
):
    """A grain dataset of this host's rows of batches ``start, ..., stop - 1`` (``source.local_batch``),
    prepared by ``options.workers`` threads up to ``options.prefetch`` ahead, in position order (``iter`` it
    for the batches; ``close()`` the iterator to stop its threads early)."""
    import grain

    if not 0 <= start <= stop:
        raise ValueError(f"data positions {start}..{stop}: need 0 <= start <= stop")

    def read(position: int) -> Batch:
        return source.local_batch(int(position), global_size, rows)

    prefetch = options.prefetch if options.workers else 0
    read_options = grain.ReadOptions(num_threads=options.workers, prefetch_buffer_size=prefetch)
    return grain.MapDataset.range(start, stop).map(read).to_iter_dataset(read_options)


class BatchPipeline:
    """Global device batches of positions ``start, start + 1, ..., stop - 1`` of ``source``, for the batch
    sharding ``sharding`` of ``global_size`` rows, of which this process reads ``rows``.

    Iterate it (or call ``next``); ``position`` is the position of the next batch it hands out, the value to
    save with a checkpoint. Close it (or use it as a context manager) to stop its threads."""

    def __init__(
        self,
        source: DataSource,
        *,
        start: int,
        stop: int,
        global_size: int,
        rows: np.ndarray,
        sharding: jax.sharding.Sharding,
        options: PipelineOptions | None = None,
    ):
        from grain.experimental import ThreadPrefetchIterDataset

        options = options or PipelineOptions()
        self.start, self.stop = start, stop
        self._returned = 0
        host = host_dataset(source, start, stop, global_size, rows, options)

        def to_device(local: Batch) -> dict[str, jax.Array]:
            return parallel.global_batch(local, sharding, global_size)

        # A transfer thread (grain.experimental.device_put's pattern; ours assembles multi-process arrays).
        self._iterator = iter(
            ThreadPrefetchIterDataset(host.map(to_device), prefetch_buffer_size=options.device_prefetch)
        )

    @property
    def position(self) -> int:
        """The position of the next batch ``next`` returns (``stop`` when exhausted)."""
        return self.start + self._returned

    def __iter__(self) -> BatchPipeline:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._iterator is None:
            raise StopIteration
        batch = next(self._iterator)
        self._returned += 1
        return batch

    def close(self) -> None:
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None  # collected now, not by grain's __del__ at interpreter exit

    def __enter__(self) -> BatchPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
