"""Orbax checkpoints: one item per trained network, optimizer state and EMA, plus JSON metadata.

Layout: ``<workdir>/checkpoints/<step>/<item>/`` with items ``<net>``, ``<net>_opt``, ``<net>_ema`` and
``meta`` (step, data position, PRNG key, non-finite counters). The directory is any ``etils.epath`` path: local
or ``gs://`` (Orbax writes the arrays through TensorStore, the rest through epath). Saves are asynchronous;
Orbax only lists a step once it is completely written, so a run killed mid-save resumes from the previous
one. A listed checkpoint that is incomplete or cannot be decoded (files deleted or truncated, bad metadata) is
moved aside to ``<workdir>/checkpoints.corrupt/`` with a warning and the next older one is used: nothing is
deleted. A read that fails with a transient I/O error (a network file system's timeout, EIO) is retried with
backoff and then raised with nothing moved: a good checkpoint is never set aside for a flaky read.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jdistill import parallel, paths

PyTree = Any
log = logging.getLogger(__name__)

# Below this many bytes a single process copies the whole state to host memory before saving (fast for small
# states, see Checkpointer.save); above it Orbax gets the device arrays and copies shard by shard.
HOST_COPY_LIMIT_BYTES = 256 << 20


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int,
        keep: int,
        async_save: bool = True,
        host_copy_limit_bytes: int | None = None,
        read_attempts: int = 4,
        retry_delay_s: float = 2.0,
    ):
        """``directory``: local or remote (``gs://...``). ``host_copy_limit_bytes``: states up to this size are
        copied to host memory in one go before saving (default ``HOST_COPY_LIMIT_BYTES``). A transient read error is tried ``read_attempts`` times
        in all, waiting ``retry_delay_s`` and then twice as long each time."""
        if read_attempts < 1:
            raise ValueError(f"read_attempts={read_attempts} must be at least 1")
        self.directory = paths.absolute(directory)
        self.every = every
        self.host_copy_limit_bytes = (
            HOST_COPY_LIMIT_BYTES if host_copy_limit_bytes is None else host_copy_limit_bytes
        )
        self.read_attempts = read_attempts
        self.retry_delay_s = retry_delay_s
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, items: dict[str, PyTree], meta: dict[str, Any]) -> None:
        """Start an (async) save of ``items`` (array pytrees) and ``meta`` (JSON) at ``step``."""
        if step in self.manager.all_steps():
            return
        if jax.process_count() == 1 and tree_bytes(items) <= self.host_copy_limit_bytes:
            # One process sees every shard: for a small state hand Orbax host arrays. Its per-shard device
            # transfers cost about 1 ms per leaf and device (a small UNet's train state on 8 CPU devices: 8.6 s
            # against 1.4 s); the files are the same and restore into the target shardings either way. A large
            # state stays on the devices: Orbax copies each shard once (one replica) as it writes it, and no
            # second, whole-state host copy is built.
            items = jax.device_get(items)
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        args["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(
        self, abstract_items: dict[str, PyTree]
    ) -> tuple[int, dict[str, PyTree], dict[str, Any]] | None:
        """The newest readable checkpoint restored into ``abstract_items``' shapes, dtypes and shardings.

        Returns None when the directory holds no checkpoint. Incomplete or undecodable checkpoints are moved
        aside; transient read errors are retried, then raised with nothing moved.
        """
        steps = sorted(self._all_steps(), reverse=True)
        for step in steps:
            for attempt in range(1, self.read_attempts + 1):
                try:
                    return (step, *self._restore_step(step, abstract_items))
                except Exception as err:
                    mismatch = self._shape_mismatch(step, abstract_items)
                    if mismatch:
                        raise CheckpointError(
                            f"checkpoint {step} in {self.directory} was written for a different model "
                            f"({mismatch}). Use a new --workdir, or the config that wrote it."
                        ) from err
                    if not (is_transient(err) or self._probe_is_transient(step)):
                        self._set_aside(step, err)  # incomplete or undecodable: the next older one
                        break
                    self._retry_or_raise(step, attempt, err)
        if steps:
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.directory} could be read; they were moved to "
                f"{self.directory}.corrupt/. Remove that directory's contents to start over."
            )
        return None

    def restore_some(self, abstract_items: dict[str, PyTree]) -> tuple[int, dict[str, PyTree]]:
        """Only the items ``abstract_items`` names, from the newest checkpoint (e.g. one network of another
        run, to start from). Errors name the directory, the missing item or the mismatched parameter."""
        step = self.manager.latest_step()
        if step is None:
            raise CheckpointError(f"{self.directory} holds no checkpoint")
        stored = set(self.manager.item_metadata(step).keys())
        missing = sorted(set(abstract_items) - stored)
        if missing:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} has no items {missing}; it has {sorted(stored)}"
            )
        mismatch = self._shape_mismatch(step, abstract_items)
        if mismatch:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not fit this model ({mismatch})"
            )
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        for attempt in range(1, self.read_attempts + 1):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
                return step, {name: restored[name] for name in abstract_items}
            except Exception as err:
                if not is_transient(err):
                    raise
                self._retry_or_raise(step, attempt, err)
        raise AssertionError("unreachable")

    def _all_steps(self) -> list[int]:
        """The listed steps; listing the directory is retried like a read."""
        for attempt in range(1, self.read_attempts + 1):
            try:
                self.manager.reload()
                return list(self.manager.all_steps())
            except Exception as err:
                if not is_transient(err):
                    raise
                self._retry_or_raise(None, attempt, err)
        raise AssertionError("unreachable")

    def _restore_step(self, step: int, abstract_items: dict[str, PyTree]) -> tuple[dict, dict]:
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        args["meta"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        items = {name: restored[name] for name in abstract_items}
        meta = dict(restored["meta"])
        if meta.get("step") != step:
            raise CheckpointError(f"metadata says step {meta.get('step')}, directory says {step}")
        return items, meta

    def _retry_or_raise(self, step: int | None, attempt: int, err: Exception) -> None:
        what = f"checkpoint {step} in {self.directory}" if step is not None else f"{self.directory}"
        if attempt >= self.read_attempts:
            raise CheckpointError(
                f"{what} could not be read after {attempt} attempts: transient I/O error "
                f"({type(err).__name__}: {str(err)[:300]}). Nothing was moved or deleted; run again when the "
                "storage is reachable."
            ) from err
        delay = self.retry_delay_s * 2 ** (attempt - 1)
        log.warning("reading %s failed (%s: %s); retrying in %.1f s", what, type(err).__name__, err, delay)
        time.sleep(delay)

    def _probe_is_transient(self, step: int) -> bool:
        """Whether walking the step's directory (listing it, reading its small metadata files) fails with a
        transient error: then the restore's failure is not evidence of a bad checkpoint."""
        try:
            for path in _walk_files(self.directory / str(step)):
                if path.name.startswith("_") or path.name in ("metadata", "manifest.ocdbt"):
                    path.read_bytes()
        except Exception as err:
            return is_transient(err)
        return False

    def _shape_mismatch(self, step: int, abstract_items: dict[str, PyTree]) -> str | None:
        """The first parameter whose stored shape differs from the expected one, if the metadata is readable."""
        try:
            handler = ocp.StandardCheckpointHandler()
            stored_items = {
                name: _shapes(handler.metadata(self.directory / str(step) / name).tree)
                for name in abstract_items
                if not name.endswith("_opt")  # optimizer states follow their parameters
            }
        except Exception:  # unreadable metadata: corrupt or a flaky read, not mismatched
            return None
        for name, stored in stored_items.items():
            expected = _shapes(abstract_items[name])
            for path in sorted(set(stored) | set(expected)):
                if stored.get(path) != expected.get(path):
                    return f"{name}{path}: stored {stored.get(path)}, expected {expected.get(path)}"
        return None

    def _set_aside(self, step: int, err: Exception) -> None:
        corrupt = epath.Path(f"{self.directory}.corrupt")
        warnings.warn(
            f"checkpoint {step} in {self.directory} is unreadable ({type(err).__name__}: {str(err)[:300]}); "
            f"moving it to {corrupt / str(step)} and falling back to an earlier one",
            stacklevel=4,
        )
        if parallel.is_main_process():
            dest = corrupt / str(step)
            corrupt.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest.rmtree()
            (self.directory / str(step)).rename(dest)
        parallel.sync(f"checkpoint_set_aside_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# Errors that say the storage could not be reached or answered, not that the data is bad: OSErrors other than
# "no such file" (timeouts, connection errors, EIO, ...), and TensorStore's status codes for the same.
_NOT_TRANSIENT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR}
_NOT_TRANSIENT_OSERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)
_TRANSIENT_STATUS = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "RESOURCE_EXHAUSTED",
    "Input/output error",
)


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` (or an error it wraps) is an I/O failure worth retrying rather than bad data."""
    for e in _chain(err):
        if isinstance(e, OSError):
            if not isinstance(e, _NOT_TRANSIENT_OSERRORS) and e.errno not in _NOT_TRANSIENT_ERRNOS:
                return True
        elif any(status in str(e) for status in _TRANSIENT_STATUS):
            return True
    return False


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, its causes and contexts, and the members of exception groups, each once."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _walk_files(root: epath.Path) -> Iterator[epath.Path]:
    for child in root.iterdir():
        if child.is_dir():
            yield from _walk_files(child)
        else:
            yield child


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of a tree's array leaves (global sizes, whatever their sharding)."""
    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(tree))


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """{"[a][b]": shape} for the array leaves of a tree (parameter trees and their Orbax metadata alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {
        "".join(f"[{getattr(k, 'key', getattr(k, 'idx', k))}]" for k in path): tuple(leaf.shape)
        for path, leaf in leaves
    }
