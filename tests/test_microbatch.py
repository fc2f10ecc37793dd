"""Gradient accumulation over micro-batches (config ``micro_batches``, jdistill/microbatch.py).

References are plain ``jax.grad`` of the full-batch loss written with jnp and one SGD step by hand: a step
with k micro-batches must land on the full batch's update, on one device and on the 4x2 mesh of fake devices,
with carries between updates matched sample by sample.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import SMALL_SWIFTBRUSH_NETS, load, max_abs_diff
from jax.sharding import PartitionSpec

from jdistill import microbatch, parallel, train
from jdistill.configuration import ConfigError
from jdistill.methods.recipe import Network, Recipe, Update
from jdistill.models.net import Net, sharding_metadata

LR = 0.1
B = 32


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, din: int = 3, hidden: int = 16, dout: int = 2):
        k1, k2 = jax.random.split(rngs.params())
        self.w1 = nnx.Param(0.5 * jax.random.normal(k1, (din, hidden)), **sharding_metadata("embed", "mlp"))
        self.b1 = nnx.Param(jnp.full((hidden,), 0.1), **sharding_metadata("mlp"))
        self.w2 = nnx.Param(0.3 * jax.random.normal(k2, (hidden, dout)), **sharding_metadata("mlp", "embed"))

    def __call__(self, x):
        return jnp.tanh(x @ self.w1 + self.b1) @ self.w2


def mlp(p, x):
    """The same MLP on a plain parameter dict: the reference side never goes through Net or the trainer."""
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def network(name: str, dout: int = 2) -> Network:
    return Network(Net(name, lambda rngs: MLP(rngs, dout=dout)), optax.sgd(LR))


def data(seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {"x": r.normal(size=(B, 3)).astype(np.float32), "y": r.normal(size=(B, 2)).astype(np.float32)}


def regression_recipe() -> Recipe:
    net = network("a")

    def loss(params, batch, key, carry):
        err = net.net.apply(params["a"], batch["x"]) - batch["y"]
        value = jnp.mean(jnp.sum(err**2, axis=1))
        return value, ({"mae": jnp.mean(jnp.abs(err))}, carry)

    return Recipe((net,), (Update("fit", ("a",), loss),), sample=lambda p, c, k: c)


def carry_recipe() -> Recipe:
    """Update "a" regresses y and carries its (detached) predictions and a per-sample mask (as the generated
    sample and its finite rows); update "b" regresses a's carried predictions on the masked rows, scaled by the
    shared step number."""
    a, b = network("a"), network("b")

    def loss_a(params, batch, key, carry):
        pred = a.net.apply(params["a"], batch["x"])
        value = jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=1))
        mask = batch["x"][:, 0] > 0
        return value, ({}, carry.replace(generated=jax.lax.stop_gradient(pred), generated_ok=mask))

    def loss_b(params, batch, key, carry):
        err = b.net.apply(params["b"], batch["x"]) - carry.generated
        value = (1.0 + carry.step) * jnp.mean(carry.generated_ok * jnp.sum(err**2, axis=1))
        return value, ({}, carry)

    updates = (
        Update("a", ("a",), loss_a, carries=("generated", "generated_ok")),
        Update("b", ("b",), loss_b),
    )
    return Recipe((a, b), updates, sample=lambda p, c, k: c)


def run_step(recipe: Recipe, batch, k: int, mesh=None, step: int = 3):
    """One train step of ``recipe`` with k micro-batches (identity prepare); on ``mesh`` the parameters are
    sharded by the 'mlp' -> fsdp rule and the batch over the batch axes. Returns (state before, state after,
    metrics, compiled HLO text)."""
    state = train._init_fn(recipe)(jax.random.key(0), {})
    fn = jax.jit(train.make_step(recipe, recipe.active_updates(step), lambda frozen, b: b, k))
    args = (state, {}, batch, np.int32(step), jax.random.key(1))
    if mesh is None:
        new, metrics = fn(*args)
        return state, new, metrics, ""
    rules = (("mlp", "fsdp"), ("embed", None))
    params_sh = {
        n.name: parallel.tree_shardings(n.net.abstract, n.net.logical_axes, rules, mesh, "replicate")
        for n in recipe.networks
    }
    placed = {**state, "params": jax.device_put(state["params"], params_sh)}
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        lowered = fn.lower(placed, {}, batch, np.int32(step), jax.random.key(1))
        new, metrics = fn(placed, {}, batch, np.int32(step), jax.random.key(1))
    return state, new, metrics, lowered.compile().as_text()


def mesh_4x2():
    return parallel.make_mesh(_mesh_cfg(4, 2))


def _mesh_cfg(data: int, fsdp: int):
    import ml_collections

    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "num_devices": data * fsdp})


def reference_regression(params, batch):
    def loss(p):
        return jnp.mean(jnp.sum((mlp(p, batch["x"]) - batch["y"]) ** 2, axis=1))

    value, grad = jax.value_and_grad(loss)(params)
    return value, jax.tree.map(lambda p, g: p - LR * g, params, grad)


@pytest.mark.parametrize("on_mesh", [False, True], ids=["1device", "mesh4x2"])
def test_micro_batches_equal_the_full_batch_update(on_mesh):
    recipe, batch = regression_recipe(), data()
    mesh = mesh_4x2() if on_mesh else None
    before, full, full_metrics, _ = run_step(recipe, batch, 1, mesh)
    _, micro, micro_metrics, _ = run_step(recipe, batch, 4, mesh)
    want_loss, want = reference_regression(before["params"]["a"], batch)
    assert max_abs_diff(full["params"]["a"], want) < 1e-6
    assert max_abs_diff(micro["params"]["a"], want) < 1e-6
    assert max_abs_diff(micro["params"]["a"], before["params"]["a"]) > 1e-3  # the update did something
    assert float(micro_metrics["fit/loss"]) == pytest.approx(float(want_loss), rel=1e-6)
    want_mae = jnp.mean(jnp.abs(mlp(before["params"]["a"], batch["x"]) - batch["y"]))
    assert float(micro_metrics["fit/mae"]) == pytest.approx(float(want_mae), rel=1e-6)
    assert float(micro_metrics["fit/grad_norm"]) == pytest.approx(
        float(full_metrics["fit/grad_norm"]), rel=1e-5
    )
    if on_mesh:
        w1 = micro["params"]["a"]["w1"]
        assert w1.sharding.spec == PartitionSpec(None, "fsdp")  # the accumulated update kept its sharding


def _collectives(hlo: str) -> set[str]:
    return set(re.findall(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)\b", hlo))


def test_micro_batches_stay_on_their_devices():
    """On a data-only mesh with replicated parameters the full-batch step only all-reduces (gradients, loss);
    splitting into micro-batches must move no rows between devices, so it adds no other collective."""
    recipe, batch = regression_recipe(), data()
    mesh = parallel.make_mesh(_mesh_cfg(8, 1))
    *_, full_hlo = run_step(recipe, batch, 1, mesh)
    *_, micro_hlo = run_step(recipe, batch, 4, mesh)
    assert _collectives(full_hlo) == {"all-reduce"}
    assert _collectives(micro_hlo) == {"all-reduce"}


@pytest.mark.parametrize("on_mesh", [False, True], ids=["1device", "mesh4x2"])
def test_per_sample_carry_reaches_the_same_rows(on_mesh):
    recipe, batch = carry_recipe(), data(1)
    mesh = mesh_4x2() if on_mesh else None
    step = 3
    before, micro, metrics, _ = run_step(recipe, batch, 4, mesh, step)
    a, b = before["params"]["a"], before["params"]["b"]
    _, want_a = reference_regression(a, batch)
    h = mlp(a, batch["x"])  # a's predictions before its update: what its loss carried
    mask = batch["x"][:, 0] > 0

    def loss_b(p):
        return (1.0 + step) * jnp.mean(mask * jnp.sum((mlp(p, batch["x"]) - h) ** 2, axis=1))

    value_b, grad_b = jax.value_and_grad(loss_b)(b)
    want_b = jax.tree.map(lambda p, g: p - LR * g, b, grad_b)
    assert max_abs_diff(micro["params"]["a"], want_a) < 1e-6
    assert max_abs_diff(micro["params"]["b"], want_b) < 1e-6
    assert max_abs_diff(micro["params"]["b"], b) > 1e-3
    assert float(metrics["b/loss"]) == pytest.approx(float(value_b), rel=1e-6)


def test_micro_batches_draw_their_own_keys():
    """Micro-batch i draws from fold_in(update key, i): independent noise per micro-batch, carried per row."""
    k, rows, key = 4, 8, jax.random.key(7)

    def loss(trainable, batch, key, carry):
        noise = jax.random.normal(key, (rows,))
        return jnp.sum(trainable["w"] * batch["x"].sum()), ({}, {"noise": noise})

    batches = microbatch.split({"x": jnp.ones((k * rows, 2))}, k)
    *_, carry, _ = microbatch.accumulate(
        loss, {"w": jnp.ones(())}, batches, key, {"step": jnp.int32(0)}, k, rows
    )
    want = np.stack([jax.random.normal(jax.random.fold_in(key, i), (rows,)) for i in range(k)])
    np.testing.assert_array_equal(np.asarray(carry["noise"]), want)


def test_split_rows_and_carry_shapes():
    x = np.arange(12 * 2).reshape(12, 2)
    parts = np.asarray(microbatch.split({"x": jnp.asarray(x)}, 3)["x"])
    np.testing.assert_array_equal(parts[1], x[1::3])  # micro-batch i: rows i, i + k, ...
    with pytest.raises(ValueError, match=r"carry entry .*'bad'.*per-sample"):
        microbatch.accumulate(
            lambda t, b, key, c: (jnp.sum(t["w"]), ({}, {"bad": jnp.zeros((3,))})),
            {"w": jnp.ones(())},
            microbatch.split({"x": jnp.ones((8, 1))}, 2),
            jax.random.key(0),
            {},
            2,
            4,
        )


def small_dmd2(*overrides):
    return load(
        "configs/dmd2.py:gmm",
        [
            ("num_steps", "4"),
            ("batch_size", "32"),
            ("log_every", "2"),
            ("progress_bar", "false"),
            ("checkpoint.every", "4"),
            ("sample.final_count", "64"),
            ("sample.batch", "64"),
            ("sample.count", "64"),
            ("mesh.num_devices", "1"),
            *SMALL_SWIFTBRUSH_NETS,
            *overrides,
        ],
    )


def test_micro_batched_dmd2_trains_alike_on_one_device_and_the_mesh():
    """DMD2 on the Gaussian mixture (its generator carries the generated batch to the fake-score update) with
    2 micro-batches trains finite, and alike on 1 and 8 devices: the micro-batch layout does not depend on
    the device count, so both see the same rows and keys."""
    from test_trainer import run_steps

    single = small_dmd2(("micro_batches", "2"))
    sharded = small_dmd2(
        ("micro_batches", "2"), ("mesh.num_devices", "8"), ("mesh.data", "4"), ("mesh.fsdp", "2")
    )
    s, state1 = run_steps(single, 2)
    _, state8 = run_steps(sharded, 2)
    assert {u.name for u in s.recipe.active_updates(0)} == {"generator", "fake_score"}
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state1["params"]))
    assert {k: int(v) for k, v in state1["nonfinite"].items()} == {"generator": 0, "fake_score": 0}
    initial = train.init_train_state(s, jax.random.fold_in(jax.random.key(single.seed), 1))
    assert max_abs_diff(state1["params"], initial["params"]) > 1e-4
    assert max_abs_diff(state1["params"], state8["params"]) < 1e-5


def test_indivisible_micro_batches_are_config_errors():
    with pytest.raises(ConfigError, match="micro_batches=3"):
        small_dmd2(("micro_batches", "3"))  # 32 rows in 3 micro-batches
    with pytest.raises(ConfigError, match="micro_batches"):
        small_dmd2(("micro_batches", "0"))
    # 32 rows = 8 micro-batches of 4, but 4 rows cannot spread over 8 batch devices
    config = small_dmd2(("micro_batches", "8"), ("mesh.num_devices", "8"))
    with pytest.raises(ConfigError, match="micro_batches=8 times the 8 devices"):
        train.setup(config, None)
    microbatch.check(32, 4, 8)  # 4 micro-batches of 8 rows, one row per device: fine
