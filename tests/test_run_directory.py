"""What a run leaves in its directory when it fails, and step timings without compilation."""

from __future__ import annotations

import pytest
from tqdm import tqdm

from jdistill import preflight, train


def test_missing_root_is_the_outermost_folder_to_create(tmp_path):
    assert preflight.missing_root(str(tmp_path)) is None
    assert preflight.missing_root(str(tmp_path / "a" / "b" / "c")) == str(tmp_path / "a")


def test_a_failed_run_removes_only_what_it_created_and_nothing_it_saved(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (tmp_path / "a" / "other").mkdir()  # not the run's: stays, and so does its parent
    assert preflight.discard_empty_run(str(run), str(tmp_path / "a"))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["other"]

    for saved in ("checkpoints/5/x", "metrics.jsonl"):
        kept = tmp_path / saved.split("/")[0] / "run"
        target = kept / saved
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text('{"step": 1}')
        assert not preflight.discard_empty_run(str(kept), str(kept))
        assert target.exists()
    empty_log = tmp_path / "log" / "run"
    empty_log.mkdir(parents=True)
    (empty_log / "metrics.jsonl").write_text("")
    assert preflight.discard_empty_run(str(empty_log), str(empty_log.parent))
    assert not empty_log.parent.exists()


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_step_clock_leaves_compilation_out_of_the_timings(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(train.time, "perf_counter", clock_time)
    clock = train.StepClock(tqdm(disable=True), "x")
    clock.compiling(0)
    clock_time.now += 30.0  # compiling and running the first step
    clock.compiled()
    clock_time.now += 4 * 0.5  # four more steps of 0.5 s
    clock.pause(0.0)
    timings = clock.window_timings(5, batch_size=8)
    assert timings["step_time_s"] == pytest.approx(0.5)
    assert timings["images_per_sec"] == pytest.approx(16.0)
    assert timings["compile_s"] == pytest.approx(30.0)
    # The next window: sampling time (a pause) is left out too, and no compile_s.
    clock_time.now += 10.0
    clock.pause(10.0)
    clock_time.now += 2 * 0.25
    timings = clock.window_timings(2, batch_size=8)
    assert timings["step_time_s"] == pytest.approx(0.25) and "compile_s" not in timings
    # A window made of one compiling step only is timed with its compilation.
    clock.compiling(7)
    clock_time.now += 6.0
    clock.compiled()
    assert clock.window_timings(1, batch_size=8)["step_time_s"] == pytest.approx(6.0)


def test_point_samples_are_saved_with_labels_and_a_scatter_plot(tmp_path):
    import numpy as np
    from helpers import load
    from PIL import Image

    from jdistill.sample_files import save_samples
    from jdistill.teachers import build_world

    world = build_world(load("configs/swiftbrush.py:gmm"))
    batch = world.eval_batch(10)
    samples = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
    save_samples(world, str(tmp_path / "final"), samples, batch, None)
    np.testing.assert_array_equal(np.load(tmp_path / "final.npy"), samples)
    np.testing.assert_array_equal(np.load(tmp_path / "final_labels.npy"), batch["cond"])
    assert Image.open(tmp_path / "final.png").size[0] > 0
    assert not (tmp_path / "final_prompts.txt").exists()
    with pytest.raises(ValueError, match="3 prompts for 10 samples"):
        save_samples(world, str(tmp_path / "other"), samples, batch, ["a", "b", "c"])


def test_a_world_build_installs_its_finished_stages_over_the_packaged_ones(tmp_path):
    import json

    from jdistill.digits.build_record import install_stages

    out, root = tmp_path / "build", tmp_path / "assets"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "model_index.json").write_text("{}")
    (out / "build.json").write_text(json.dumps({"teacher": {"steps": 3}}))
    (root / "teacher").mkdir(parents=True)
    (root / "teacher" / "stale.bin").write_text("old")
    assert install_stages(str(out), {"teacher": str(root / "teacher")}, str(root)) == str(root)
    assert sorted(p.name for p in (root / "teacher").iterdir()) == ["model_index.json"]
    assert json.loads((root / "build.json").read_text()) == {"teacher": {"steps": 3}}
    with pytest.raises(FileNotFoundError, match="classifier is missing: run the build first"):
        install_stages(str(out), {"classifier": str(root / "classifier")}, str(root))


def test_a_world_build_exports_its_teacher_afresh_without_the_export_record(tmp_path):
    from jdistill.digits.build_record import export_teacher

    calls = []

    def export_run(config, run_dir, dst):
        calls.append((config, run_dir, dst))
        (tmp_path / "out" / "teacher").mkdir(parents=True)
        (tmp_path / "out" / "teacher" / "model_index.json").write_text("{}")
        (tmp_path / "out" / "teacher" / "jdistill_export.json").write_text("{}")

    (tmp_path / "out" / "teacher").mkdir(parents=True)
    (tmp_path / "out" / "teacher" / "stale.bin").write_text("old")
    export_teacher(export_run, "config", "run", str(tmp_path / "out"))
    assert calls == [("config", "run", str(tmp_path / "out" / "teacher"))]
    assert sorted(p.name for p in (tmp_path / "out" / "teacher").iterdir()) == ["model_index.json"]
