"""Scanned stacks (models/stack.py): the scan equals the layers applied one by one, parameters stack on a
leading layer axis that is never sharded, and conversion maps them to per-layer torch keys both ways."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill.convert.core import ConversionError, load_state_dict, to_state_dict
from jdistill.models.layers import FP32, layer_norm, linear
from jdistill.models.net import Net
from jdistill.models.stack import Stack


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = layer_norm(6, 1e-6, rngs, FP32)
        self.proj = linear(6, 6, rngs, FP32)

    def __call__(self, x, scale):
        return x + scale * jnp.tanh(self.proj(self.norm(x)))


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, remat=False):
        self.proj_in = linear(3, 6, rngs, FP32)
        self.transformer_blocks = Stack(Block, 4, rngs, remat=remat)

    def __call__(self, x, scale):
        return self.transformer_blocks(self.proj_in(x), scale)


def one_by_one(p, x, scale):
    """The same network written out layer by layer from the stacked parameters (numpy-level reference)."""
    h = x @ p["proj_in"]["kernel"] + p["proj_in"]["bias"]
    blocks = p["transformer_blocks"]["stacked"]
    for i in range(4):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        n = (h - mu) / jnp.sqrt(var + 1e-6) * blocks["norm"]["scale"][i] + blocks["norm"]["bias"][i]
        h = h + scale * jnp.tanh(n @ blocks["proj"]["kernel"][i] + blocks["proj"]["bias"][i])
    return h


@pytest.fixture(scope="module")
def net():
    return Net("m", lambda r: Model(r))


def test_scan_equals_the_layers_one_by_one_with_and_without_remat(net):
    params = net.init(jax.random.key(0))
    # Random norms too: a stacked copy of one layer's values would hide a layer-index mix-up.
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), params)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    assert np.allclose(jax.jit(net.apply)(params, x, 0.5), one_by_one(params, x, 0.5), atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(net.apply(p, x, 0.5) ** 2))(params)
    remat = Net("m", lambda r: Model(r, remat="full"))
    grads_remat = jax.grad(lambda p: jnp.sum(remat.apply(p, x, 0.5) ** 2))(params)
    want = jax.grad(lambda p: jnp.sum(one_by_one(p, x, 0.5) ** 2))(params)
    for a, b, c in zip(
        jax.tree.leaves(grads), jax.tree.leaves(grads_remat), jax.tree.leaves(want), strict=True
    ):
        assert np.allclose(a, c, atol=1e-5) and np.allclose(b, c, atol=1e-5)


def test_stacked_parameters_have_a_replicated_layer_axis(net):
    assert net.abstract["transformer_blocks"]["stacked"]["proj"]["kernel"].shape == (4, 6, 6)
    assert net.logical_axes["transformer_blocks"]["stacked"]["proj"]["kernel"] == (None, "embed", "mlp")
    assert net.logical_axes["proj_in"]["kernel"] == ("embed", "mlp")


def test_conversion_uses_per_layer_torch_keys_both_ways(net):
    params = jax.tree.map(np.asarray, net.init(jax.random.key(2)))
    state = to_state_dict(params)
    kernel = params["transformer_blocks"]["stacked"]["proj"]["kernel"]
    layer_keys = [f"{n}.{leaf}" for n in ("norm", "proj") for leaf in ("weight", "bias")]
    assert set(state) == {"proj_in.weight", "proj_in.bias"} | {
        f"transformer_blocks.{i}.{k}" for i in range(4) for k in layer_keys
    }
    np.testing.assert_array_equal(state["transformer_blocks.2.proj.weight"], kernel[2].T)  # torch (out, in)
    np.testing.assert_array_equal(
        state["transformer_blocks.3.norm.weight"], params["transformer_blocks"]["stacked"]["norm"]["scale"][3]
    )
    back = load_state_dict(net.abstract, state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    missing = {k: v for k, v in state.items() if k != "transformer_blocks.1.proj.bias"}
    with pytest.raises(ConversionError, match=r"1 missing: transformer_blocks\.1\.proj\.bias"):
        load_state_dict(net.abstract, missing)
    extra = {**state, "transformer_blocks.4.proj.bias": state["transformer_blocks.0.proj.bias"]}
    with pytest.raises(ConversionError, match=r"unexpected: transformer_blocks\.4\.proj\.bias"):
        load_state_dict(net.abstract, extra)
    wrong = {**state, "transformer_blocks.2.proj.weight": np.zeros((6, 5), np.float32)}
    with pytest.raises(ConversionError, match=r"transformer_blocks\.2\.proj\.weight: checkpoint \(6, 5\)"):
        load_state_dict(net.abstract, wrong)
