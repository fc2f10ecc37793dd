"""Exporting when training ends (``export_when_done``) reuses the run's world and final state: the export is
the one a fresh ``--mode export`` writes from the checkpoint, without building the world a second time."""

from __future__ import annotations

from helpers import small_swiftbrush

from jdistill import train
from jdistill.export import export_run


def test_export_after_training_reuses_the_run_and_equals_a_fresh_export(tmp_path, monkeypatch):
    config = small_swiftbrush(("num_steps", "2"), ("checkpoint.every", "2"), ("sample.final_count", "8"))
    workdir = str(tmp_path / "run")
    trained = train.run_training(config, workdir)
    assert trained.step == 2 and trained.results == train.recorded_final_evaluation(
        train.MetricsLog(tmp_path / "run" / "metrics.jsonl", 2), 2
    )

    built = []
    setup = train.setup
    monkeypatch.setattr(train, "setup", lambda *a, **k: built.append(a) or setup(*a, **k))
    export_run(config, workdir, str(tmp_path / "reused"), trained=trained)
    assert built == []  # nothing built or restored again
    export_run(config, workdir, str(tmp_path / "fresh"))
    assert len(built) == 1  # --mode export's path: the world built and the checkpoint restored

    files = sorted(p.name for p in (tmp_path / "fresh").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "reused").iterdir()) and "student.safetensors" in files
    for name in files:  # the same bytes: the final state is the last checkpoint's (EMA as sampling uses it)
        assert (tmp_path / "reused" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name

    # A run that had already finished and been evaluated trains nothing: export then restores as usual.
    again = train.run_training(config, workdir)
    assert again.setup is None and again.results == trained.results
