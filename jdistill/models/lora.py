"""Low-rank adapters (LoRA) on a frozen network's linear kernels, as pure functions of parameter trees.

A LoRA is a flat dict ``{module: {"A": (in, r), "B": (r, out)}}`` keyed by the module's torch name (e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``). The adapted kernel is
``W + (alpha / r) A B``; ``B`` starts at zero, so an adapted network starts equal to its base. Merging is a
parameter-tree transform applied before the network runs: no module changes, and ``jax.jvp`` / ``grad``
pass through it like any other array arithmetic.

Targets default to diffusers' UNet LoRA targets (the attention projections ``to_q``, ``to_k``, ``to_v``,
``to_out.0``); export writes merged weights or a peft-format ``pytorch_lora_weights.safetensors`` that
``pipe.load_lora_weights`` reads. In a scanned stack (``models/stack.py``: FLUX, SD3, T5) an adapter pair covers
the stacked kernel of every layer: ``A`` (layers, in, r), ``B`` (layers, r, out), keyed by the module name with
``stacked`` for the layer index, and exported per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.models.naming import STACKED, key_str

PyTree = Any
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names (last components of the torch name)

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def _module(path) -> str:
    """The module's torch name; in a scanned stack with ``stacked`` where the layer index goes (one adapter
    pair per stacked kernel, itself stacked on the layer axis)."""
    return ".".join(key_str(p) for p in path[:-1])


def _layer_name(module: str, layer: int) -> str:
    return module.replace(f".{STACKED}.", f".{layer}.", 1)


def _is_target(module: str, targets: tuple[str, ...]) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


def target_kernels(base: PyTree, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, tuple[int, ...]]:
    """module name -> (in, out) of every linear kernel whose module is a target; (layers, in, out) for a
    kernel of a scanned stack."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
        name = str(getattr(path[-1], "key", path[-1]))
        module = _module(path)
        if name == "kernel" and _is_target(module, targets):
            linear_ndim = 3 if f".{STACKED}." in f".{module}." else 2
            if len(leaf.shape) != linear_ndim:
                raise ValueError(f"LoRA target {module} has a {len(leaf.shape)}-d kernel; only linear layers")
            found[module] = tuple(leaf.shape)
    if not found:
        raise ValueError(f"no linear layer matches the LoRA targets {targets}")
    return found


def init_lora(
    key: jax.Array, base: PyTree, config: LoRAConfig, dtype=jnp.float32
) -> dict[str, dict[str, jax.Array]]:
    """A: uniform with bound 1/sqrt(in) (peft's Kaiming-uniform with a = sqrt(5)); B: zeros."""
    out = {}
    for i, (module, shape) in enumerate(sorted(target_kernels(base, config.targets).items())):
        *layers, fan_in, fan_out = shape
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(
            jax.random.fold_in(key, i), (*layers, fan_in, config.rank), dtype, -bound, bound
        )
        out[module] = {"A": a, "B": jnp.zeros((*layers, config.rank, fan_out), dtype)}
    return out


def merge_lora(base: PyTree, lora: dict[str, dict[str, jax.Array]], config: LoRAConfig) -> PyTree:
    """``base`` with every adapted kernel replaced by W + scale A B (in the kernel's dtype)."""
    used = set()

    def merge(path, leaf):
        if str(getattr(path[-1], "key", path[-1])) != "kernel":
            return leaf
        module = _module(path)
        if module not in lora:
            return leaf
        used.add(module)
        delta = config.scale * (lora[module]["A"].astype(jnp.float32) @ lora[module]["B"].astype(jnp.float32))
        return (leaf.astype(jnp.float32) + delta).astype(leaf.dtype)

    merged = jax.tree_util.tree_map_with_path(merge, base)
    unknown = sorted(set(lora) - used)
    if unknown:
        raise ValueError(f"LoRA modules not in the base network: {unknown[:10]}")
    return merged


def lora_state_dict(
    lora: dict[str, dict[str, Any]],
    config: LoRAConfig,
    prefix: str = "unet.",
    rename: Callable[[str], str] | None = None,
) -> dict[str, np.ndarray]:
    """peft-format tensors (``<prefix><module>.lora_A.weight`` (r, in), ``lora_B.weight`` (out, r)), module
    names passed through ``rename`` (the checkpoint's numbering where it differs from the model's).

    The scale is folded into B, so the file means exactly W + A B with diffusers' default alpha = rank.
    """
    out = {}
    for module, ab in lora.items():
        a, b = np.asarray(ab["A"], np.float32), config.scale * np.asarray(ab["B"], np.float32)
        # A scanned stack's adapters are written per layer, under the layer's own module name.
        pieces = (
            {module: (a, b)} if a.ndim == 2 else {_layer_name(module, i): (a[i], b[i]) for i in range(len(a))}
        )
        for name, (a_i, b_i) in pieces.items():
            name = rename(name) if rename else name
            out[f"{prefix}{name}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            out[f"{prefix}{name}.lora_B.weight"] = np.ascontiguousarray(b_i.T)
    return out


class LoRANet:
    """A trained LoRA on a frozen base network, with the interface of a ``Net``.

    Its own parameters are the adapters only (that is all the optimizer, EMA and checkpoints hold); ``apply``
    takes ``{"base": base params, "lora": adapters}`` and runs the base network with the adapters merged in.
    """

    def __init__(self, name: str, base, config: LoRAConfig):
        self.name = name
        self.base = base
        self.config = config
        shapes = target_kernels(base.abstract, config.targets)
        self.abstract = {
            module: {
                "A": jax.ShapeDtypeStruct((*layers, fan_in, config.rank), jnp.float32),
                "B": jax.ShapeDtypeStruct((*layers, config.rank, fan_out), jnp.float32),
            }
            for module, (*layers, fan_in, fan_out) in shapes.items()
        }
        # The adapters' model-width dimensions carry "lora", which the default rules split over fsdp; a
        # stack's layer axis is never split.
        self.logical_axes = {
            module: {
                "A": (None,) * (len(shape) - 2) + ("lora", None),
                "B": (None,) * (len(shape) - 2) + (None, "lora"),
            }
            for module, shape in shapes.items()
        }

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        return init_lora(key, self.base.abstract, self.config)

    def apply(self, params: dict[str, PyTree], *args, method: str | None = None, **kwargs) -> Any:
        merged = merge_lora(params["base"], params["lora"], self.config)
        return self.base.apply(merged, *args, method=method, **kwargs)

    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.abstract))
