"""A stack of identical blocks with their parameters stacked on a leading layer axis, run with a scan.

Compile time and program size stay flat as layers are added: XLA sees one block. The parameters of an
``N``-layer ``Stack`` live under the attribute ``stacked`` with shape ``(N, ...)``; ``jdistill.convert.core``
maps them to the per-layer torch keys (``transformer_blocks.3.attn.to_q.weight``) by that attribute name, and
the layer axis is never sharded (its logical name is None).

Every block's ``__call__`` takes the carried state first (an array or a tuple of arrays) and the arguments
shared by every layer after it, and returns the new carried state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from jdistill.models.layers import block_caller
from jdistill.models.naming import STACKED
from jdistill.models.net import _ABSTRACT, build_layer


class Stack(nnx.Module):
    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        num_layers: int,
        rngs: nnx.Rngs,
        *,
        remat: bool | str = False,
    ):
        if num_layers < 1:
            raise ValueError(f"a Stack needs at least one layer, got {num_layers}")

        def create(r: nnx.Rngs) -> nnx.Module:
            @nnx.split_rngs(splits=num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def one(r):
                token = _ABSTRACT.set(False)  # the whole stack is built abstractly at once, not per layer
                try:
                    return make_block(r)
                finally:
                    _ABSTRACT.reset(token)

            return one(r)

        self.num_layers = num_layers
        # Runtime options are plain attributes (static in the graph definition), not parameters.
        self.remat = remat
        setattr(self, STACKED, build_layer(create, rngs))

    def __call__(self, carry: Any, *shared: Any) -> Any:
        call = block_caller(self.remat, "attention")  # a stack's blocks are transformer blocks

        def body(block, carry):
            return call(block, carry, *shared)

        run = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        return run(getattr(self, STACKED), carry)
