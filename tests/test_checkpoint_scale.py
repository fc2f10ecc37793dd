"""Checkpoints and run directories at scale: device-array saves of sharded states (no whole-state host copy),
transient read errors retried and never taken for corruption, and whole runs in a non-local run directory
(``fake://``, tests/fake_fs.py) through etils.epath."""

from __future__ import annotations

import errno
import json
import os

import fake_fs
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import logged_metrics
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file

from jdistill import checkpoint
from jdistill.checkpoint import Checkpointer, CheckpointError, is_transient, tree_bytes


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake:// store under tmp_path/store; the test runs in an empty working directory, which must stay
    empty (a fake:// string handed to open/os.path would create ``fake:`` there)."""
    fs = fake_fs.install(tmp_path / "store")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield fs
    fake_fs.uninstall()
    assert sorted(os.listdir(cwd)) == []


def _host_items() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "net": {
            "kernel": rng.normal(size=(64, 32)).astype(np.float32),
            "bias": np.linspace(-1, 1, 32, dtype=np.float32),
        },
        "net_opt": {"mu": rng.normal(size=(64, 32)).astype(np.float32), "count": np.array(7, np.int32)},
    }


def _placed(host, mesh):
    """Kernels split over all 8 devices (both mesh axes), the rest replicated."""
    split = NamedSharding(mesh, PartitionSpec("fsdp", "data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda x: split if x.ndim == 2 else replicated, host)
    return jax.device_put(host, shardings), shardings


def _abstract(host, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), host, shardings)


def _assert_equal(restored, host) -> None:
    flat_r, flat_h = jax.tree_util.tree_leaves_with_path(restored), jax.tree_util.tree_leaves_with_path(host)
    assert [p for p, _ in flat_r] == [p for p, _ in flat_h]
    for (_, r), (_, h) in zip(flat_r, flat_h, strict=True):
        assert np.array_equal(np.asarray(r), h)


def test_large_sharded_state_is_saved_from_device_arrays(tmp_path, monkeypatch):
    """Above the host-copy limit Orbax gets the very device arrays (original shardings), and no jax.device_get
    of the state happens; below it, the small-state fast path hands host arrays. Both restore exactly."""
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    host = _host_items()
    assert tree_bytes(host) == sum(x.size * x.itemsize for x in jax.tree.leaves(host))
    items, shardings = _placed(host, mesh)
    assert len(items["net"]["kernel"].sharding.device_set) == 8
    assert not items["net"]["kernel"].sharding.is_fully_replicated

    fetched, handed = [], []
    device_get, standard_save = jax.device_get, ocp.args.StandardSave
    monkeypatch.setattr(jax, "device_get", lambda x: fetched.append(x) or device_get(x))
    monkeypatch.setattr(
        ocp.args, "StandardSave", lambda tree, **kw: handed.append(tree) or standard_save(tree, **kw)
    )
    state_leaves = {id(x) for x in jax.tree.leaves(items)}

    big = Checkpointer(tmp_path / "device", every=1, keep=1, host_copy_limit_bytes=1024)
    big.save(1, items, {"step": 1})
    big.wait()
    assert not [call for call in fetched if {id(x) for x in jax.tree.leaves(call)} & state_leaves]
    leaves = [x for tree in handed for x in jax.tree.leaves(tree)]
    assert len(leaves) == 4 and all(id(x) in state_leaves for x in leaves)  # the arrays themselves, no copies
    for tree, name in zip(handed, items, strict=True):
        assert jax.tree.map(lambda x: x.sharding, tree) == shardings[name]
    big.close()

    handed.clear()
    small = Checkpointer(tmp_path / "host", every=1, keep=1)  # default limit: 256 MiB
    small.save(1, items, {"step": 1})
    small.wait()
    assert all(isinstance(x, np.ndarray) for tree in handed for x in jax.tree.leaves(tree))
    small.close()

    for directory in ("device", "host"):
        ckpt = Checkpointer(tmp_path / directory, every=0, keep=1)
        step, restored, meta = ckpt.restore(_abstract(host, shardings))
        ckpt.close()
        assert step == 1 and meta == {"step": 1}
        _assert_equal(restored, host)
        assert restored["net"]["kernel"].sharding == shardings["net"]["kernel"]


def _save_two_steps(directory, host, items) -> None:
    ckpt = Checkpointer(directory, every=1, keep=2)
    for step in (1, 2):
        scaled = jax.tree.map(lambda x, s=step: x * s, items)
        ckpt.save(step, scaled, {"step": step})
    ckpt.close()


def _scaled(host, step):
    return jax.tree.map(lambda x: x * step, host)


@pytest.mark.parametrize(
    "error",
    [
        fake_fs.transient_error,
        lambda: TimeoutError(errno.ETIMEDOUT, "read timed out"),
        lambda: ConnectionResetError(errno.ECONNRESET, "connection reset by peer"),
    ],
    ids=["EIO", "timeout", "connection_reset"],
)
def test_transient_read_error_leaves_the_checkpoint_in_place(fake, error, caplog):
    """Reads of the newest checkpoint fail with a network file system's error: retried, then an error naming
    the checkpoint; nothing is moved. When the storage recovers within the attempts, the restore succeeds."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    host = _host_items()
    items, shardings = _placed(host, mesh)
    directory = "fake://bucket/run/checkpoints"
    _save_two_steps(directory, host, items)
    stored = fake.root / "bucket" / "run"
    assert sorted(os.listdir(stored / "checkpoints")) == ["1", "2"]

    ckpt = Checkpointer(directory, every=0, keep=2, read_attempts=3, retry_delay_s=0.01)
    step2 = lambda path: "/checkpoints/2/" in path  # noqa: E731
    fake.fail_reads(step2, times=1000, error=error)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint 2 in fake://bucket/run/checkpoints could not be read "
        r"after 3 attempts: transient I/O error .*Nothing was moved",
    ):
        ckpt.restore(_abstract(host, shardings))
    assert sorted(os.listdir(stored / "checkpoints")) == ["1", "2"]
    assert not (stored / "checkpoints.corrupt").exists()
    assert "retrying" in caplog.text

    fake.read_faults.clear()
    fake.fail_reads(step2, times=2, error=error)  # two failed reads, then the storage answers
    step, restored, meta = ckpt.restore(_abstract(host, shardings))
    ckpt.close()
    assert step == 2 and meta["step"] == 2
    _assert_equal(restored, _scaled(host, 2))
    assert not (stored / "checkpoints.corrupt").exists()


def _break_metadata(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"step": ')


def _truncate_arrays(step_dir):
    data = [p for p in (step_dir / "net").rglob("*") if p.is_file() and p.parent.name == "d"]  # OCDBT data
    assert data
    for path in data:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage", [_break_metadata, _truncate_arrays], ids=["bad_metadata", "truncated_arrays"]
)
def test_undecodable_checkpoint_is_moved_aside(fake, damage):
    """A complete-looking checkpoint whose metadata or array data does not decode is set aside (not deleted)
    and the previous one restored, in the non-local directory as locally."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    host = _host_items()
    items, shardings = _placed(host, mesh)
    directory = "fake://bucket/run/checkpoints"
    _save_two_steps(directory, host, items)
    damage(fake.root / "bucket" / "run" / "checkpoints" / "2")
    ckpt = Checkpointer(directory, every=0, keep=2, read_attempts=3, retry_delay_s=0.01)
    with pytest.warns(UserWarning, match="checkpoint 2 .* unreadable"):
        step, restored, _ = ckpt.restore(_abstract(host, shardings))
    ckpt.close()
    assert step == 1
    _assert_equal(restored, host)
    assert os.path.isdir(fake.root / "bucket" / "run" / "checkpoints.corrupt" / "2")


def test_transient_errors_are_told_from_bad_data():
    eio = OSError(errno.EIO, "Input/output error")
    wrapped = ValueError("restore failed")
    wrapped.__cause__ = TimeoutError("timed out")
    assert is_transient(eio) and is_transient(wrapped) and is_transient(ConnectionResetError())
    assert is_transient(ExceptionGroup("reads", [ValueError("x"), ConnectionError("reset")]))
    assert is_transient(ValueError("UNAVAILABLE: gcs returned 503"))
    assert is_transient(ValueError("DEADLINE_EXCEEDED: read of gs://b/x"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "No such file", "x"))
    assert not is_transient(OSError(errno.ENOENT, "No such file"))
    assert not is_transient(ValueError("NOT_FOUND: array data missing"))
    assert not is_transient(json.JSONDecodeError("Expecting value", "{", 1))
    with pytest.raises(ValueError, match="read_attempts=0 must be at least 1"):
        Checkpointer("/tmp/unused", every=0, keep=1, read_attempts=0)


# ================================================================================================ whole runs


def test_run_resume_and_export_in_a_non_local_run_directory(fake, tmp_path, monkeypatch):
    """Train (crashing at step 4), resume and export with workdir = fake://bucket/run: every file lands in the
    fake store (none in the working directory), and the results equal the same run made straight through in a
    local directory."""
    from helpers import small_swiftbrush

    from jdistill import train
    from jdistill.configuration import load_run_config
    from jdistill.export import export_run

    config = small_swiftbrush(("num_steps", "6"), ("checkpoint.every", "3"))
    remote = "fake://bucket/run"
    original = train.StepFunctions.__call__

    def crash_at_4(self, step_num):
        if step_num == 4:
            raise RuntimeError("simulated crash")
        return original(self, step_num)

    monkeypatch.setattr(train.StepFunctions, "__call__", crash_at_4)
    # The remote run saves from device arrays (the large-state path, while the loop donates the state to the
    # next step), the local one from a host copy: both must hold the same values.
    limit = checkpoint.HOST_COPY_LIMIT_BYTES
    monkeypatch.setattr(checkpoint, "HOST_COPY_LIMIT_BYTES", 0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train(config, remote)
    monkeypatch.setattr(train.StepFunctions, "__call__", original)
    train.train(config, remote)  # resumes from step 3
    monkeypatch.setattr(checkpoint, "HOST_COPY_LIMIT_BYTES", limit)
    local = str(tmp_path / "local")
    train.train(config, local)

    run = fake.root / "bucket" / "run"
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]
    assert (run / "samples" / "final.npy").is_file() and (run / "samples" / "final.png").is_file()
    remote_metrics = logged_metrics(run)
    local_metrics = logged_metrics(tmp_path / "local")
    assert [m["step"] for m in remote_metrics] == [m["step"] for m in local_metrics] == [2, 4, 6, 6]
    assert remote_metrics[-1] == local_metrics[-1]  # the final evaluation
    assert load_run_config(remote).to_dict() == load_run_config(local).to_dict()

    assert export_run(load_run_config(remote), remote) == remote + "/export"
    export_run(config, local)
    ours, straight = (
        load_file(run / "export" / "student.safetensors"),
        load_file(os.path.join(local, "export", "student.safetensors")),
    )
    assert ours.keys() == straight.keys() and all(np.array_equal(ours[k], straight[k]) for k in ours)
    assert np.array_equal(
        np.load(run / "samples" / "final.npy"), np.load(os.path.join(local, "samples", "final.npy"))
    )
    written = {path for op, path in fake.ops if op.startswith("open:w")}
    assert remote + "/config.json" in written and remote + "/export/student.safetensors" in written


def test_diffusers_export_to_a_non_local_directory(fake, tiny_pipelines, tmp_path):
    """A pipeline export (components streamed from the local teacher, a bfloat16 UNet, JSON files) into
    fake://: the same files, byte for byte, as the same export into a local directory."""
    from test_pipeline import tiny_config

    from jdistill.convert.export import export_pipeline
    from jdistill.teachers import build_world

    world = build_world(tiny_config(tiny_pipelines, "sd"))
    kwargs = {"prediction": "eps", "timesteps": (999.0,), "dtype": "bfloat16"}
    remote = export_pipeline(world.source, "fake://bucket/export", world.frozen["teacher"], **kwargs)
    local = export_pipeline(world.source, str(tmp_path / "local"), world.frozen["teacher"], **kwargs)
    assert remote == local

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    ours, theirs = files(fake.root / "bucket" / "export"), files(tmp_path / "local")
    assert "unet/diffusion_pytorch_model.safetensors" in ours and "vae/config.json" in ours
    assert ours.keys() == theirs.keys() and all(ours[k] == theirs[k] for k in ours)
    with pytest.raises(FileExistsError, match="fake://bucket/export exists and is not empty"):
        export_pipeline(world.source, "fake://bucket/export", world.frozen["teacher"], **kwargs)
