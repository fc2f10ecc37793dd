"""Gradient accumulation: one optimizer update from the gradients of k micro-batches of the step's batch.

With ``micro_batches = k`` the train step cuts its batch of B rows into k micro-batches of B / k rows, runs
each update's loss and gradient on one micro-batch at a time (a ``lax.scan``, so only one micro-batch's
activations are alive) and applies the mean of the k gradients in one optimizer update. For a loss that is a
mean over the batch's samples this is the full batch's gradient, so a paper's global batch runs on fewer chips.
Losses built on whole-batch statistics (a batch-wide normalisation) would see micro-batch statistics instead.

Randomness: micro-batch i draws from ``fold_in(update key, i)``, so the result equals the full batch's in
distribution, not bitwise (the same noise is not drawn for the same sample).

Layout: micro-batch i holds rows i, i + k, i + 2k, ... of the batch: ``(B, ...) -> (B/k, k, ...) -> (k, B/k,
...)``. A device of the batch axes holds a contiguous block of B / n rows; with B / (k n) whole, each of its
blocks of k rows holds one row of every micro-batch, so each micro-batch is split over all batch devices from
rows that stay where they are (no communication), and ``constrain_stacked`` says so to XLA.

The batch is prepared (token ids -> embeddings, images -> VAE latents) one micro-batch at a time as well, once
per step: the text encoder's or VAE's activations at full batch are what would not fit, while their outputs
(embeddings, latents) are small and shared by every update of the step.

Carries between the updates of a step (``recipe.Update``): every leaf an update's loss returns in its carry is
either per-sample (leading dimension = the micro-batch's rows, e.g. the generated batch x or a row mask) or a
scalar that does not depend on the batch (the step number). Per-sample leaves are stacked over micro-batches,
(k, B/k, ...), and micro-batch i of a later update gets the rows micro-batch i produced; of a scalar, the
first micro-batch's value is kept. Any other shape is an error naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jdistill.configuration import ConfigError
from jdistill.nonfinite import is_count
from jdistill.parallel import constrain_batch

PyTree = Any
# (trainable, batch, key, carry) -> (loss, (metrics, carry)); gradients are taken w.r.t. ``trainable``.
GradLoss = Callable[[PyTree, dict, jax.Array, dict], tuple[jax.Array, tuple[dict, dict]]]


def check(batch_size: int, micro_batches: int, batch_devices: int, mesh_description: str = "") -> None:
    """Raise ConfigError unless every micro-batch has a whole, equal number of rows on every batch device."""
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ConfigError(f"micro_batches must be a positive integer, got {micro_batches!r}")
    if batch_size % (micro_batches * batch_devices):
        where = f" ({mesh_description})" if mesh_description else ""
        raise ConfigError(
            f"batch_size={batch_size} must be divisible by micro_batches={micro_batches} times the "
            f"{batch_devices} devices of the batch axes{where}, i.e. by {micro_batches * batch_devices}"
        )


def split(tree: PyTree, k: int) -> PyTree:
    """Every leaf (B, ...) -> (k, B/k, ...); micro-batch i is rows i, i + k, ... (see the module docstring)."""

    def one(x):
        if x.ndim == 0 or x.shape[0] % k:
            raise ValueError(f"cannot split a batch entry of shape {x.shape} into {k} micro-batches")
        return constrain_stacked(jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1))

    return jax.tree.map(one, tree)


def constrain_stacked(x: jax.Array) -> jax.Array:
    """Keep dimension 1 (the rows of each micro-batch) of a stacked (k, rows, ...) array split over the batch
    axes of the mesh set around the step; without one, or with rows the axes do not divide, do nothing."""
    return constrain_batch(x, dim=1)


def prepare_stacked(prepare: Callable[[PyTree, dict], dict], frozen: PyTree, batch: dict, k: int) -> dict:
    """``prepare`` one micro-batch at a time; returns the prepared micro-batches stacked, (k, ...) each."""
    prepared = jax.lax.map(lambda part: prepare(frozen, part), split(batch, k))
    return jax.tree.map(constrain_stacked, prepared)


def _accumulator_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)  # bfloat16 gradients summed in float32


def accumulate(
    loss_fn: GradLoss, trainable: PyTree, batches: dict, key: jax.Array, carry: dict, k: int, rows: int
) -> tuple[jax.Array, dict, dict, PyTree]:
    """The loss, metrics, carry and gradients of one update over k stacked micro-batches of ``rows`` rows.

    ``batches``: prepared micro-batches, (k, ...) each (``prepare_stacked``). ``carry``: scalars shared by
    every micro-batch and stacked per-sample arrays (k, rows, ...). Returns the mean loss, mean metrics, the
    new carry in the same layout and the mean gradients (in the parameters' dtypes).
    """
    leaves, treedef = jax.tree.flatten(carry)
    stacked_at = [i for i, x in enumerate(leaves) if jnp.ndim(x) > 0]
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(total, xs):
        i, batch, stacked = xs
        own = list(leaves)
        for j, x in zip(stacked_at, stacked, strict=True):
            own[j] = x
        (loss, (metrics, new_carry)), grads = grad_fn(
            trainable, batch, jax.random.fold_in(key, i), jax.tree.unflatten(treedef, own)
        )
        total = jax.tree.map(lambda t, g: t + g.astype(t.dtype), total, grads)
        return total, (loss, metrics, new_carry)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, _accumulator_dtype(p.dtype)), trainable)
    xs = (jnp.arange(k, dtype=jnp.int32), batches, [leaves[j] for j in stacked_at])
    total, (losses, metrics, new_carries) = jax.lax.scan(body, zeros, xs)
    grads = jax.tree.map(lambda t, p: (t / k).astype(p.dtype), total, trainable)
    # Counts of samples (non-finite rows left out) add up over the micro-batches; the other metrics average.
    metrics = {k: (jnp.sum if is_count(k) else jnp.mean)(m, axis=0) for k, m in metrics.items()}
    return jnp.mean(losses), metrics, _stacked_carry(new_carries, rows), grads


def _stacked_carry(carries: PyTree, rows: int) -> PyTree:
    """Scan outputs (k, ...) -> the carry layout: per-sample leaves (k, rows, ...) as they are, scalars from the
    first micro-batch."""

    def one(path, x):
        if x.ndim == 1:
            return x[0]
        if x.shape[1] == rows:
            return x
        raise ValueError(
            f"carry entry {jax.tree_util.keystr(path)} has shape {x.shape[1:]} per micro-batch of {rows} rows: "
            "with micro_batches > 1 a carry leaf must be per-sample (leading dimension = the batch's rows) "
            "or a scalar"
        )

    return jax.tree_util.tree_map_with_path(one, carries)
