"""Orbax checkpoints: one item per trained network, optimizer state and EMA, plus JSON metadata.

Layout: ``<workdir>/checkpoints/<step>/<item>/`` with items ``<net>``, ``<net>_opt``, ``<net>_ema`` and
``meta`` (step, data position, PRNG key, non-finite counters, config fingerprint). Saves are asynchronous;
Orbax only lists a step once it is completely written, so a run killed mid-save resumes from the previous
one. A listed checkpoint that cannot be read (files deleted or truncated) is moved aside to
``<workdir>/checkpoints.corrupt/`` with a warning and the next older one is used: nothing is deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from jdistill import parallel

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
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
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        args["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(
        self, abstract_items: dict[str, PyTree]
    ) -> tuple[int, dict[str, PyTree], dict[str, Any]] | None:
        """The newest readable checkpoint restored into ``abstract_items``' shapes, dtypes and shardings.

        Returns None when the directory holds no checkpoint. Unreadable checkpoints are moved aside.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
                args["meta"] = ocp.args.JsonRestore()
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
                items = {name: restored[name] for name in abstract_items}
                meta = dict(restored["meta"])
                if meta.get("step") != step:
                    raise CheckpointError(f"metadata says step {meta.get('step')}, directory says {step}")
                return step, items, meta
            except Exception as err:
                self._set_aside(step, err)
        if steps:
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.directory} could be read; they were moved to "
                f"{self.directory}.corrupt/. Remove that directory's contents to start over."
            )
        return None

    def _set_aside(self, step: int, err: Exception) -> None:
        warnings.warn(
            f"checkpoint {step} in {self.directory} is unreadable ({type(err).__name__}: {str(err)[:300]}); "
            f"moving it to {self.directory}.corrupt/{step} and falling back to an earlier one",
            stacklevel=3,
        )
        if parallel.is_main_process():
            dest = os.path.join(self.directory + ".corrupt", str(step))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.exists(dest):
                shutil.rmtree(dest)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        parallel.sync(f"checkpoint_set_aside_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs (with shardings) of a tree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
