"""PRNG streams: one independent key per purpose, derived by name.

Keys are derived with ``fold_in`` of a stable hash of the purpose's name, never by splitting a key in a
call-order-dependent way: adding a new random draw somewhere cannot shift the randomness of another, and a
run resumed at step n sees exactly the keys an uninterrupted run would have seen.
"""

from __future__ import annotations

import zlib

import jax


def name_id(name: str) -> int:
    """A stable 31-bit integer for a stream name."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def stream(key: jax.Array, name: str) -> jax.Array:
    """The key of stream ``name`` under ``key``."""
    return jax.random.fold_in(key, name_id(name))


def streams(key: jax.Array, *names: str) -> dict[str, jax.Array]:
    """Several named keys at once: ``streams(key, "noise", "timestep")["noise"]``."""
    return {n: stream(key, n) for n in names}


def step_key(root: jax.Array, step: int | jax.Array) -> jax.Array:
    """The key of one training step: a function of the run's root key and the step number only."""
    return jax.random.fold_in(stream(root, "train_step"), step)
