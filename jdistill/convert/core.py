"""Name and layout rules between PyTorch state dicts and jdistill's Flax parameter trees.

jdistill's modules carry the attribute names of their diffusers / transformers twins, so a parameter path
("down_blocks", 0, "resnets", 0, "conv1", "kernel") maps to the torch key "down_blocks.0.resnets.0.conv1.weight"
by one table of leaf rules:

    flax leaf    torch leaf   layout (torch -> flax)
    kernel       weight       Linear (out, in) -> (in, out); Conv2d OIHW -> HWIO; Conv1d OIW -> WIO
    scale        weight       (norms)
    embedding    weight       (embeddings)
    bias         bias
    anything     same name    as is (e.g. CLIP's logit_scale, class_embedding)

Per-model differences are expressed as key renames (functions of the torch key). Loading is strict: missing,
unexpected and mis-shaped tensors raise a ``ConversionError`` that names every offending key.

A scanned stack (``models/stack.py``) keeps its layers' parameters under the path element ``stacked`` with a
leading layer axis: ("transformer_blocks", "stacked", "attn", "to_q", "kernel") of shape (N, in, out) is the N
torch keys "transformer_blocks.{i}.attn.to_q.weight", stacked on load and split on export.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jdistill.models.naming import STACKED, torch_key
from jdistill.models.naming import key_str as _key_str

PyTree = Any
_KERNEL_TO_FLAX = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0)}
_KERNEL_TO_TORCH = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}


class ConversionError(ValueError):
    """A checkpoint does not fit the model; the message lists the keys and shapes involved."""


def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim not in _KERNEL_TO_FLAX:
            raise ConversionError(f"cannot convert a {array.ndim}-d kernel")
        return np.transpose(array, _KERNEL_TO_FLAX[array.ndim])
    return array


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return np.transpose(array, _KERNEL_TO_TORCH[array.ndim])
    return array


def _flat(tree: PyTree) -> list[tuple[tuple, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]


def expected_keys(abstract: PyTree) -> dict[str, tuple[tuple, tuple[int, ...], int | None]]:
    """torch key -> (flax path, flax shape of that tensor, layer index in a stack or None) for every parameter
    of an abstract tree."""
    out = {}
    for path, leaf in _flat(abstract):
        names = tuple(_key_str(p) for p in path)
        if STACKED in names:
            for i in range(leaf.shape[0]):
                out[torch_key(path, i)] = (names, tuple(leaf.shape[1:]), i)
        else:
            out[torch_key(path)] = (names, tuple(leaf.shape), None)
    return out


def _unflatten(items: Iterable[tuple[tuple[str, ...], Any]], like: PyTree) -> PyTree:
    """Rebuild a nested dict with the key types of ``like`` (NNX lists use int keys)."""
    by_path = {path: value for path, value in items}

    def one(path, leaf):
        return by_path[tuple(_key_str(p) for p in path)]

    return jax.tree_util.tree_map_with_path(one, like, is_leaf=lambda x: hasattr(x, "shape"))


def load_state_dict(
    abstract: PyTree,
    state_dict: Mapping[str, Any],
    *,
    rename: Callable[[str], str] | None = None,
    ignore: Iterable[str] = (),
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
    what: str = "model",
) -> PyTree:
    """A Flax parameter tree shaped like ``abstract`` from a torch state dict (numpy arrays or lazy loaders).

    ``rename`` maps checkpoint keys to the model's torch keys; keys matching a regex in ``ignore`` are
    skipped (buffers such as position ids). ``place(path, array)`` puts each converted array where it belongs
    (default: a host numpy array in the abstract dtype). Raises ``ConversionError`` naming every missing,
    unexpected or mis-shaped key.
    """
    expected = expected_keys(abstract)
    ignore_re = [re.compile(p) for p in ignore]
    given: dict[str, str] = {}
    for key in state_dict:
        if any(r.search(key) for r in ignore_re):
            continue
        given[rename(key) if rename else key] = key
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_list([given[k] for k in unexpected])}")
    if problems:
        raise ConversionError(f"checkpoint does not match the {what}: " + "; ".join(problems))
    dtypes = {tuple(_key_str(p) for p in path): leaf.dtype for path, leaf in _flat(abstract)}
    arrays: dict[tuple, Any] = {}
    layers: dict[tuple, dict[int, np.ndarray]] = {}
    bad = []
    for key, (path, shape, layer) in expected.items():
        value = state_dict[given[key]]
        array = np.asarray(value() if callable(value) else value)
        converted = to_flax_layout(path[-1], array)
        if converted.shape != shape:
            bad.append(
                f"{given[key]}: checkpoint {tuple(array.shape)}, model expects {_torch_shape(path[-1], shape)}"
            )
            continue
        converted = converted.astype(dtypes[path])
        if layer is None:
            arrays[path] = converted
        else:
            layers.setdefault(path, {})[layer] = converted
    if bad:
        raise ConversionError(f"checkpoint does not match the {what}: {len(bad)} mis-shaped: {_list(bad)}")
    for path, by_layer in layers.items():
        arrays[path] = np.stack([by_layer[i] for i in range(len(by_layer))])
    return _unflatten(((p, place(p, a) if place else a) for p, a in arrays.items()), abstract)


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(flax_shape) in _KERNEL_TO_TORCH:
        return tuple(flax_shape[i] for i in _KERNEL_TO_TORCH[len(flax_shape)])
    return flax_shape


def _list(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def to_state_dict(params: PyTree, *, rename: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
    """The torch state dict (numpy arrays, torch layouts) of a Flax parameter tree; inverse of loading."""
    out = {}
    for path, leaf in _flat(params):
        array, leaf_name = np.asarray(leaf), _key_str(path[-1])
        if STACKED in (_key_str(p) for p in path):
            pieces = {torch_key(path, i): array[i] for i in range(array.shape[0])}
        else:
            pieces = {torch_key(path): array}
        for key, piece in pieces.items():
            out[rename(key) if rename else key] = np.ascontiguousarray(to_torch_layout(leaf_name, piece))
    return out
