"""The trainer in-process on 8 fake CPU devices: sharding equivalence, exact resume, checkpoint fallback,
non-finite updates, update schedules."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import max_abs_diff, small_swiftbrush

from jdistill import parallel, train
from jdistill.checkpoint import CheckpointError


def run_steps(config, n: int, workdir: str = "/nonexistent"):
    """Initialise and run n steps without the loop (no checkpoints); returns (setup, state)."""
    s = train.setup(config, workdir)
    root = jax.random.key(config.seed)
    state = train.init_train_state(s, jax.random.fold_in(root, 1))
    steps = train.StepFunctions(s)
    for step in range(n):
        local = s.world.conditions.local_batch(step, config.batch_size, s.rows)
        batch = parallel.global_batch(local, s.batch_sharding, config.batch_size)
        state, _ = steps(step)(state, s.frozen, batch, np.int32(step), root)
    return s, state


def test_sharded_step_equals_single_device():
    assert jax.device_count() == 8
    single = small_swiftbrush(("mesh.num_devices", "1"))
    sharded = small_swiftbrush(("mesh.num_devices", "8"), ("mesh.data", "4"), ("mesh.fsdp", "2"))
    _s1, state1 = run_steps(single, 3)
    s8, state8 = run_steps(sharded, 3)
    assert dict(s8.mesh.shape) == {"data": 4, "fsdp": 2}
    # The fsdp rules really shard something (hidden "mlp" dims over fsdp), and the batch spans all 8 devices.
    specs = [sh.spec for sh in jax.tree.leaves(s8.state_shardings["params"])]
    assert any("fsdp" in str(spec) for spec in specs)
    assert len(state8["params"]["student"]["blocks"][0]["fc1"]["kernel"].sharding.device_set) == 8
    assert max_abs_diff(state1["params"], state8["params"]) < 1e-5
    assert max_abs_diff(state1["opt"], state8["opt"]) < 1e-5
    assert max_abs_diff(state1["ema"], state8["ema"]) < 1e-5


def _final_state(config, workdir):
    _, state, step = train.restore_latest(config, workdir)
    return step, state


def test_resume_after_crash_is_exact(tmp_path, monkeypatch):
    config = small_swiftbrush(("num_steps", "20"), ("checkpoint.every", "10"))
    straight = str(tmp_path / "straight")
    train.train(config, straight)

    crashed = str(tmp_path / "crashed")
    calls = {"n": 0}
    original = train.StepFunctions.__call__

    def crash_at_15(self, step_num):
        calls["n"] += 1
        if step_num == 15:
            raise RuntimeError("simulated crash")
        return original(self, step_num)

    monkeypatch.setattr(train.StepFunctions, "__call__", crash_at_15)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train(config, crashed)
    monkeypatch.setattr(train.StepFunctions, "__call__", original)
    train.train(config, crashed)  # resumes from step 10

    step_a, a = _final_state(config, straight)
    step_b, b = _final_state(config, crashed)
    assert step_a == step_b == 20
    assert max_abs_diff(a["params"], b["params"]) == 0.0
    assert max_abs_diff(a["opt"], b["opt"]) == 0.0
    assert max_abs_diff(a["ema"], b["ema"]) == 0.0
    # metrics.jsonl holds each logged step once, although steps 11-14 ran twice.
    with open(os.path.join(crashed, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    train_steps = [s for s in steps if s <= 20]
    assert sorted(set(train_steps)) == list(range(2, 21, 2))


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    config = small_swiftbrush(("num_steps", "6"), ("checkpoint.every", "3"))
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    reference_step, reference = _final_state(config, workdir)
    assert reference_step == 6
    ckpt_dir = os.path.join(workdir, "checkpoints")
    # Corrupt the newest checkpoint: delete the array data of one item.
    item = os.path.join(ckpt_dir, "6", "student")
    assert os.path.isdir(item)
    shutil.rmtree(item)
    with pytest.warns(UserWarning, match="checkpoint 6 .* unreadable"):
        train.train(config, workdir)  # restores step 3, redoes 4..6
    assert os.path.isdir(os.path.join(ckpt_dir + ".corrupt", "6"))  # moved aside, not deleted
    step, state = _final_state(config, workdir)
    assert step == 6
    assert max_abs_diff(reference["params"], state["params"]) == 0.0


def test_nonfinite_updates_are_skipped_then_stop(tmp_path):
    config = small_swiftbrush(
        ("networks.student.optimizer.lr", "nan"), ("max_nonfinite_streak", "3"), ("num_steps", "8")
    )
    _s, state0 = run_steps(config, 0)
    before = jax.device_get(state0["params"]["student"])
    _, state = run_steps(config, 2)
    # NaN learning rate: every generator update is skipped, the student keeps its initial parameters.
    assert max_abs_diff(before, state["params"]["student"]) == 0.0
    assert int(state["nonfinite"]["generator"]) == 2
    assert int(state["nonfinite"]["fake_score"]) == 0
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.TrainingError, match="non-finite"):
        train.train(config, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(ckpts) or not [d for d in os.listdir(ckpts) if d.isdigit()]


def test_update_schedule_every_k():
    config = small_swiftbrush(("method.generator_every", "3"))
    s, state0 = run_steps(config, 0)
    assert [u.name for u in s.recipe.active_updates(0)] == ["generator", "fake_score"]
    assert [u.name for u in s.recipe.active_updates(1)] == ["fake_score"]
    student0 = jax.device_get(state0["params"]["student"])
    _, state = run_steps(config, 3)  # generator ran at step 0 only
    count = jax.tree.leaves(state["opt"]["student"])
    counts = [int(x) for x in count if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer)]
    assert counts and all(c == 1 for c in counts)
    assert max_abs_diff(student0, state["params"]["student"]) > 0


def test_checkpoint_of_another_model_is_refused_not_moved(tmp_path):
    workdir = str(tmp_path / "run")
    train.train(small_swiftbrush(("num_steps", "3")), workdir)
    wider = small_swiftbrush(("num_steps", "6"), ("networks.student.model.width", "48"))
    with pytest.raises(
        CheckpointError,
        match=r"different model \(student\[blocks\]\[0\]\[fc1\]\[kernel\]: stored \(32, 64\), expected \(48, 64\)\)",
    ):
        train.train(wider, workdir)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))  # left where it was
    assert not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))


def test_networks_can_start_from_another_runs_checkpoint(tmp_path):
    """networks.student.init_from: a fresh run's student = the other run's latest student (its fake score and
    optimizer state start fresh); a wrong directory or a mismatched network is named."""
    first = str(tmp_path / "first")
    train.train(small_swiftbrush(("num_steps", "3")), first)
    _, donor, _ = train.restore_latest(small_swiftbrush(("num_steps", "3")), first)
    config = small_swiftbrush(("num_steps", "3"), ("networks.student.init_from", first))
    s = train.setup(config, str(tmp_path / "second"))
    ckpt = train.Checkpointer(str(tmp_path / "second" / "checkpoints"), every=0, keep=1)
    step, state, _ = train.restore_or_init(s, ckpt)
    ckpt.close()
    assert step == 0
    assert max_abs_diff(state["params"]["student"], donor["params"]["student"]) == 0.0
    assert max_abs_diff(state["ema"]["student"], donor["params"]["student"]) == 0.0
    assert max_abs_diff(state["params"]["fake_score"], donor["params"]["fake_score"]) > 0  # fresh
    assert all(float(np.abs(x).sum()) == 0 for x in jax.tree.leaves(state["opt"]["student"][0].mu))

    with pytest.raises(Exception, match=r"networks\.student\.init_from=.*does not exist"):
        train.train(
            small_swiftbrush(("networks.student.init_from", str(tmp_path / "nowhere"))), str(tmp_path / "c")
        )
    assert not os.path.exists(tmp_path / "nowhere")  # nothing created where the user pointed by mistake
    wider = small_swiftbrush(("networks.student.init_from", first), ("networks.student.model.width", "48"))
    with pytest.raises(CheckpointError, match=r"does not fit this model \(student\[blocks\]"):
        train.train(wider, str(tmp_path / "d"))
