"""A step cut into one compiled program per update (config ``split_updates``): the same updates as the
one-program step, carries and the prepared batch handed over split across the batch axes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import load, max_abs_diff, small_swiftbrush
from jax.sharding import PartitionSpec
from test_microbatch import carry_recipe, data, mesh_4x2
from test_trainer import run_steps

from jdistill import parallel, train
from jdistill.configuration import ConfigError

STEP = 3


def _placed(recipe, mesh, batch):
    state = train._init_fn(recipe)(jax.random.key(0), {})
    rules = (("mlp", "fsdp"), ("embed", None))
    shardings = {
        n.name: parallel.tree_shardings(n.net.abstract, n.net.logical_axes, rules, mesh, "replicate")
        for n in recipe.networks
    }
    placed = {**state, "params": jax.device_put(state["params"], shardings)}
    return placed, jax.device_put(batch, parallel.batch_sharding(mesh))


@pytest.mark.parametrize("k", [1, 2])
def test_programs_per_update_equal_the_one_program_step(k):
    """Update b reads a's carried predictions and row mask: after the split step, both networks and the
    metrics equal the one-program step's, and the carry handed from the first
    program to the second is split over the batch axes as ``transfer_shardings`` says."""
    recipe, mesh = carry_recipe(), mesh_4x2()
    active = recipe.active_updates(STEP)
    identity = lambda frozen, b: b  # noqa: E731
    start, batch = _placed(recipe, mesh, data())
    step, root = np.int32(STEP), jax.random.key(1)
    with jax.set_mesh(mesh):
        whole, whole_metrics = jax.jit(train.make_step(recipe, active, identity, k))(
            start, {}, batch, step, root
        )
        first, second = (jax.jit(p) for p in train.make_update_programs(recipe, active, identity, k))
        state, metrics_a, handed = first(start, {}, batch, step, root)
        state, metrics_b, rest = second(state, {}, handed, step, root)
    assert rest == ()
    assert max_abs_diff(whole["params"], state["params"]) < 1e-6
    assert max_abs_diff(whole["nonfinite"], state["nonfinite"]) == 0
    split_metrics = {**metrics_a, **metrics_b}
    assert split_metrics.keys() == whole_metrics.keys()
    assert max_abs_diff(whole_metrics, split_metrics) < 1e-6
    assert float(whole_metrics["b/loss"]) > 0  # b's loss reads the carry: a wrong hand-over would not match

    prepared, carry = handed
    expected = train.transfer_shardings(mesh, (prepared, carry), k)
    for array, sharding in zip(jax.tree.leaves((prepared, carry)), jax.tree.leaves(expected), strict=True):
        assert array.sharding.is_equivalent_to(sharding, array.ndim)
    batch_dim = 1 if k > 1 else 0
    assert carry.generated.sharding.spec[batch_dim] == parallel.BATCH_AXES
    assert expected[1].step.spec == PartitionSpec()


def test_split_updates_in_the_trainer_match_one_program():
    """Swiftbrush's student and fake-score updates on the 4x2 mesh, three steps through the trainer's own
    step functions, split and whole."""
    mesh = (("mesh.num_devices", "8"), ("mesh.data", "4"), ("mesh.fsdp", "2"))
    _, whole = run_steps(small_swiftbrush(*mesh), 3)
    s, split = run_steps(small_swiftbrush(*mesh, ("split_updates", "true")), 3)
    assert isinstance(train.StepFunctions(s)(0), train.UpdatePrograms)
    assert max_abs_diff(whole["params"], split["params"]) < 1e-5
    assert max_abs_diff(whole["opt"], split["opt"]) < 1e-5


def test_split_updates_must_be_a_boolean():
    with pytest.raises(ConfigError, match="split_updates"):
        load("configs/swiftbrush.py:gmm", [("split_updates", "2")])
