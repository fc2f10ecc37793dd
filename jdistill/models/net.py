"""A Flax NNX module split once into a graph definition and a pure parameter pytree.

jdistill keeps modules in NNX but trains pure functions: a ``Net`` holds the graphdef, the abstract
parameters (shapes plus the logical axis names used for sharding) and a constructor; ``apply`` merges a
plain dict of arrays back into the module for one call. jit, grad, optax and Orbax all see plain pytrees.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jdistill.models.naming import STACKED

PyTree = Any

# Set while a Net computes its parameter shapes: layers built through ``build_layer`` are then traced one at a
# time. (Tracing a whole large model at once is quadratic in its size: every RNG counter update inside the
# trace makes JAX search the partial jaxpr for an error message that is never shown; SDXL took 75 s.)
_ABSTRACT: contextvars.ContextVar[bool] = contextvars.ContextVar("jdistill_abstract_layers", default=False)


def build_layer(make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """Construct a parameterised layer: abstractly (shapes only, no memory) during a Net's shape pass."""
    if _ABSTRACT.get():
        return nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    return make(rngs)


class Net:
    """A module definition with functional ``init`` and ``apply``.

    ``config`` is the module's own configuration (e.g. a ``UNetConfig``) when it has one, and ``remake(config)``
    a constructor of the same module, with the same precision and options, from another such configuration:
    ``variant`` builds a network with this one's architecture plus changes (LCM's student: the teacher's UNet
    with a guidance embedding).
    """

    def __init__(
        self,
        name: str,
        make: Callable[[nnx.Rngs], nnx.Module],
        *,
        config: Any = None,
        remake: Callable[[Any], Callable[[nnx.Rngs], nnx.Module]] | None = None,
    ):
        self.name = name
        self.make = make
        self.config = config
        self.remake = remake
        token = _ABSTRACT.set(True)
        try:
            module = make(nnx.Rngs(0))
        finally:
            _ABSTRACT.reset(token)
        self.graphdef, state = nnx.split(module)
        self.abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state)
        )
        self.logical_axes = _logical_axes(state)

    def init(self, key: jax.Array) -> PyTree:
        """Fresh parameters as a plain nested dict of arrays."""
        _, state = nnx.split(self.make(nnx.Rngs(key)))
        return nnx.to_pure_dict(state)

    def apply(self, params: PyTree, *args, method: str | None = None, **kwargs) -> Any:
        """Call the module (or its method ``method``) with ``params`` merged in."""
        module = nnx.merge(self.graphdef, params)
        return (getattr(module, method) if method else module)(*args, **kwargs)

    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.abstract))

    def variant(self, **changes) -> Callable[[nnx.Rngs], nnx.Module]:
        """A constructor of this module with fields of its configuration changed (same precision and options)."""
        if self.remake is None or not dataclasses.is_dataclass(self.config):
            raise ValueError(f"network {self.name!r} has no configuration to build a variant from")
        return self.remake(dataclasses.replace(self.config, **changes))


def _logical_axes(state: nnx.State) -> PyTree:
    """Per-parameter tuple of logical axis names (from ``out_sharding`` metadata) or None, as a pure dict."""

    def axes(path, var):
        names = var.get_metadata().get("out_sharding")
        if names and STACKED in path and len(names) == len(var.get_value().shape) - 1:
            names = (None, *names)  # the layer axis of a scanned stack: never sharded
        return tuple(names) if names else None

    flat = nnx.to_flat_state(state)
    tree: dict = {}
    for path, var in flat:
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = axes(path, var)
    return tree


def sharding_metadata(*names: str | None) -> dict[str, Any]:
    """Metadata that tags a parameter with logical axis names for the sharding rules.

    Eager sharding is off: parameters are created abstractly first and placed by the trainer.
    """
    return {"out_sharding": tuple(names), "eager_sharding": False}
