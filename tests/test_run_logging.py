"""What a run shows while it trains: metrics.jsonl and TensorBoard event files (read back with TensorBoard's own
reader), timings, evaluation every ``eval.every`` steps, a profiler trace, and a finished run that is not
evaluated twice."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers import gmm_quality, logged_metrics, small_swiftbrush

from jdistill import train
from jdistill.metric_writers import MetricWriters


def event_accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def png_pixels(encoded: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as img:
        return np.asarray(img.convert("RGB"))


def test_writers_put_scalars_images_and_text_where_tensorboard_reads_them(tmp_path):
    config = small_swiftbrush()
    writers = MetricWriters(config, str(tmp_path), resume_step=0)
    writers.scalars(3, {"student/loss": 0.25, "bad": float("nan"), "steps_per_sec": 7.0})
    writers.scalars(5, {"student/loss": 0.125})
    image = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    writers.image(5, "samples", image)
    writers.text("config", '{"seed": 0}')
    writers.close()

    records = logged_metrics(tmp_path)
    assert records == [
        {"step": 3, "student/loss": 0.25, "bad": None, "steps_per_sec": 7.0},
        {"step": 5, "student/loss": 0.125},
    ]
    events = event_accumulator(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("student/loss")] == [(3, 0.25), (5, 0.125)]
    assert "bad" not in events.Tags()["scalars"]  # a non-finite value has no point to draw
    (shown,) = events.Images("samples")
    assert shown.step == 5 and (shown.height, shown.width) == (12, 20)
    np.testing.assert_array_equal(png_pixels(shown.encoded_image_string), image)  # PNG: lossless
    (text,) = events.Tensors("config/text_summary")
    assert '{"seed": 0}' in text.tensor_proto.string_val[0].decode()


def test_tensorboard_can_be_turned_off(tmp_path):
    writers = MetricWriters(small_swiftbrush(("logging.tensorboard", "false")), str(tmp_path), 0)
    writers.scalars(1, {"a": 1.0})
    writers.close()
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Four swiftbrush steps on the mixture with logging, sampling and evaluation every two, a one-step trace."""
    workdir = tmp_path_factory.mktemp("run")
    config = small_swiftbrush(
        ("num_steps", "4"),
        ("log_every", "2"),
        ("checkpoint.every", "2"),
        ("sample.every", "2"),
        ("eval.every", "2"),
        ("profile.steps", "1"),
        ("profile.warmup", "1"),
    )
    results = train.train(config, str(workdir))
    return config, workdir, results


def test_loop_logs_timings_and_evaluates_every_eval_every_steps(logged_run):
    config, workdir, results = logged_run
    records = logged_metrics(workdir)
    steps = [r for r in records if "steps_per_sec" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for r in steps:
        assert r["step_time_s"] == pytest.approx(1.0 / r["steps_per_sec"])
        assert r["images_per_sec"] == pytest.approx(config.batch_size * r["steps_per_sec"])
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]  # at eval.every, and the final one (not twice at step 4)
    assert evals[-1] == {"step": 4, **{f"eval/{k}": v for k, v in results.items()}}

    # The evaluation at step 2 scored exactly the samples it wrote (64 = eval count: all of them kept here),
    # recomputed with the tests' own mixture statistics.
    samples = np.load(workdir / "samples" / "eval_0000002.npy")
    labels = np.load(workdir / "samples" / "eval_0000002_labels.npy")
    assert len(samples) == config.sample.final_count
    within, shares, consistent = gmm_quality(samples, labels)
    assert evals[0]["eval/within_radius"] == pytest.approx(within)
    assert evals[0]["eval/min_mode_share"] == pytest.approx(shares.min())
    assert evals[0]["eval/class_consistency"] == pytest.approx(consistent)
    # The same noise as the final evaluation, another student: other samples.
    assert not np.allclose(samples, np.load(workdir / "samples" / "final.npy"))


def test_loop_writes_tensorboard_events_and_a_profile(logged_run):
    config, workdir, _ = logged_run
    events = event_accumulator(workdir / "tensorboard")
    tags = events.Tags()
    losses = [t for t in tags["scalars"] if t.endswith("/loss")]
    assert losses and [e.step for e in events.Scalars(losses[0])] == [2, 4]
    assert [e.step for e in events.Scalars("eval/within_radius")] == [2, 4]
    assert {"samples", "eval", "final"} <= set(tags["images"])
    assert [e.step for e in events.Images("samples")] == [2, 4]
    (text,) = events.Tensors("config/text_summary")
    assert json.loads((workdir / "config.json").read_text())["seed"] == config.seed
    assert '"num_steps": 4' in text.tensor_proto.string_val[0].decode()
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_a_finished_run_is_not_evaluated_again(logged_run):
    config, workdir, results = logged_run
    before = (workdir / "metrics.jsonl").read_text()
    again = train.train(config, str(workdir))
    assert again == pytest.approx(results)
    assert (workdir / "metrics.jsonl").read_text() == before


def _random_inception_file(path) -> None:
    """pytorch-fid's Inception layout with random weights (He-scaled convolutions, unit batch norms), saved as
    the converted .safetensors file jdistill reads."""
    import jax
    from safetensors.numpy import save_file

    from jdistill.convert.inception import inception_net, inception_state_dict

    rng = np.random.default_rng(0)
    abstract = inception_net().abstract
    zeros = inception_state_dict(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract))
    state = {}
    for key, value in zeros.items():
        if key.endswith("conv.weight"):
            fan_in = int(np.prod(value.shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), value.shape).astype(np.float32)
        elif key.endswith(("bn.weight", "bn.running_var")):
            value = np.ones_like(value)
        state[key] = value
    save_file(state, str(path))


@pytest.mark.e2e  # a digits-world step, then InceptionV3 at 299 px and a tiny CLIP on its samples
def test_fid_and_clip_score_of_a_real_teachers_samples_during_training(tmp_path):
    """On the digits world (a VAE teacher with text prompts): eval.fid_* and eval.clip_model add FID and the
    CLIP score to the evaluation, equal to the metrics recomputed from the final samples decoded by diffusers'
    own VAE and the prompts the run wrote."""
    import torch
    from diffusers import AutoencoderKL
    from helpers import load
    from test_clip_score import VARIANTS as CLIP_VARIANTS
    from test_clip_score import make_pair, tokenizer

    from jdistill.evaluate.clip_score import CLIPScore
    from jdistill.evaluate.fid import InceptionFeatures, fid, save_statistics, statistics_of
    from jdistill.teachers.presets import DIGITS_TEACHER

    inception = tmp_path / "inception.safetensors"
    _random_inception_file(inception)
    features = InceptionFeatures.from_file(inception, batch_size=8)
    reference = np.random.default_rng(1).uniform(0, 1, (16, 32, 32, 3)).astype(np.float32)
    save_statistics(tmp_path / "reference.npz", statistics_of(reference, features))
    clip_dir = tmp_path / "clip"
    make_pair(CLIP_VARIANTS[1]).model.save_pretrained(clip_dir, safe_serialization=True)
    tokenizer().save_pretrained(clip_dir)

    workdir = tmp_path / "run"
    config = load(
        "configs/swiftbrush.py:digits",
        [
            ("num_steps", "1"),
            ("batch_size", "2"),
            ("log_every", "1"),
            ("progress_bar", "false"),
            ("checkpoint.every", "1"),
            ("sample.final_count", "8"),
            ("sample.batch", "8"),
            ("mesh.num_devices", "1"),
            ("eval.fid_inception", str(inception)),
            ("eval.fid_reference", str(tmp_path / "reference.npz")),
            ("eval.clip_model", str(clip_dir)),
        ],
    )
    results = train.train(config, str(workdir))

    vae = AutoencoderKL.from_pretrained(DIGITS_TEACHER, subfolder="vae")
    latents = torch.from_numpy(np.load(workdir / "samples" / "final.npy")).permute(0, 3, 1, 2)
    with torch.no_grad():
        images = vae.decode(latents / vae.config.scaling_factor).sample.permute(0, 2, 3, 1).numpy()
    images = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
    prompts = (workdir / "samples" / "final_prompts.txt").read_text().splitlines()
    assert len(prompts) == len(images) == 8
    assert results["fid"] == pytest.approx(fid(images, tmp_path / "reference.npz", features), rel=1e-3)
    assert results["clip_score"] == pytest.approx(
        CLIPScore.from_pretrained(str(clip_dir))(images, prompts), abs=1e-3
    )
    final = [r for r in logged_metrics(workdir) if "eval/fid" in r]
    assert [r["step"] for r in final] == [1]


def test_profile_flag_traces_steps_after_warmup(tmp_path):
    """``--profile`` on the command line: a trace of a few steps (after profile.warmup) in DIR/profile."""

    from helpers import SMALL, SMALL_SWIFTBRUSH_NETS, run_main

    overrides = [*SMALL, *SMALL_SWIFTBRUSH_NETS, ("num_steps", "4"), ("profile.warmup", "1")]
    overrides = [(k, v) for k, v in overrides if k != "num_steps" or v == "4"]
    done = run_main(tmp_path, overrides=overrides, flags=["--profile"], quick_compile=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "profile").rglob("*.xplane.pb"))) == 1
    assert "profile of steps 1-3 written" in done.stderr  # --profile's 5 steps, cut at the run's end
    assert json.loads((tmp_path / "config.json").read_text())["profile"]["steps"] == 5


def test_tensorboard_events_of_a_remote_run_directory_reach_the_store(tmp_path, monkeypatch):
    """A run directory on an object store (``fake://`` through etils.epath, as ``gs://``): the event files are
    staged locally and copied there; nothing is written under a local ``fake:`` folder."""
    import os

    import fake_fs

    fs = fake_fs.install(tmp_path / "store")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    try:
        from etils import epath

        epath.Path("fake://bucket/run").mkdir(parents=True)  # as the entry point makes the run directory
        writers = MetricWriters(small_swiftbrush(), "fake://bucket/run", resume_step=0)
        writers.scalars(2, {"student/loss": 0.5})
        writers.close()
    finally:
        fake_fs.uninstall()
    assert os.listdir(cwd) == []
    stored = fs.root / "bucket" / "run"
    assert json.loads((stored / "metrics.jsonl").read_text()) == {"step": 2, "student/loss": 0.5}
    events = event_accumulator(stored / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("student/loss")] == [(2, 0.5)]


def test_wandb_gets_the_same_scalars_images_and_text(tmp_path, monkeypatch):
    """``logging.wandb``: the run is opened under the workdir's id and receives what TensorBoard receives.
    wandb is not a dependency; a stand-in module records the calls the writer makes on its public API."""
    import sys
    import types

    calls, summary = [], {}

    class Run:
        def __init__(self):
            self.summary = summary

        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(
        sys.modules, "wandb", types.SimpleNamespace(init=init, Image=lambda a: ("image", a.shape))
    )
    config = small_swiftbrush(("logging.tensorboard", "false"), ("logging.wandb", "true"))
    writers = MetricWriters(config, str(tmp_path), 0)
    writers.scalars(3, {"student/loss": 0.25, "bad": float("nan")})
    writers.image(3, "samples", np.zeros((4, 6, 3), np.uint8))
    writers.text("config", "{}")
    writers.close()
    (init_call, *rest) = calls
    assert init_call[1]["project"] == config.logging.wandb_project and init_call[1]["resume"] == "allow"
    assert init_call[1]["id"].startswith("jdistill-") and init_call[1]["config"]["seed"] == config.seed
    assert rest == [
        ("log", 3, {"student/loss": 0.25}),  # the non-finite value left out, as in TensorBoard
        ("log", 3, {"samples": ("image", (4, 6, 3))}),
        ("finish",),
    ]
    assert summary == {"config": "{}"}
    # A resumed run logs to the same W&B run (its id follows the workdir); another workdir to another one.
    calls.clear()
    MetricWriters(config, str(tmp_path), 3).close()
    assert calls[0][1]["id"] == init_call[1]["id"]
    calls.clear()
    MetricWriters(config, str(tmp_path / "other"), 0).close()
    assert calls[0][1]["id"] != init_call[1]["id"]


def test_wandb_missing_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    writers = MetricWriters(small_swiftbrush(("logging.wandb", "true")), str(tmp_path), 0)
    writers.close()
    assert "pip install wandb" in caplog.text
