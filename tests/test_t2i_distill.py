"""T2I-Distill's sCM and MeanFlow settings on FLUX.1-lite (configs/scm.py:flux_lite, configs/meanflow.py:flux_lite).

- the x1 time scale (``timestep_scale``) against diffusers' FluxTransformer2DModel fed the same numbers / 1000;
- MeanFlow's second time embedder copied from the first, and the exported diffusers class (with that embedder)
  against jdistill's transformer;
- MeanFlow's (r, t) draws against the logit-normal they come from;
- the acceptance runs: ``python -m jdistill.main --config configs/<recipe>.py:flux_lite`` with only the teacher
  path, data, resolution, batch and step count overridden, on 8 fake devices with fsdp, resumed bit-exactly and
  exported; diffusers draws what jdistill's sampler draws (sCM: plain FluxPipeline at one and two steps;
  MeanFlow: FluxPipeline with the exported MeanFlow transformer class at four steps);
- both presets planned abstractly at real size (FLUX.1-lite-8B, fsdp=8).

The acceptance runs take about 3 minutes each on 2 cores and are marked ``e2e``
(``python -m pytest -m e2e tests/test_t2i_distill.py``); the rest is in the default run (about 40 s).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_flow_pipeline
import torch
from conftest import CACHE_DIR
from helpers import REPO, load, logged_metrics, main_command, subprocess_env
from test_export_flow import PROMPTS, pipeline_latents, to_pipeline_layout
from test_flux import LATENT, TEXT, inputs, rel_err, torch_flux, torch_forward
from test_recipes_flow import _draws, _leaves_equal

from jdistill import export, train
from jdistill.convert.flux import flux_state_dict, load_flux
from jdistill.methods import common
from jdistill.methods.common import build_network
from jdistill.models.flux import FluxConfig, image_ids, pack_latents, text_ids


@pytest.fixture(scope="module")
def guided_flux():
    """(torch FluxTransformer2DModel with a guidance embedding, its numpy state dict)."""
    model = torch_flux(True)
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


def test_time_scale_one_is_diffusers_fed_times_over_1000(guided_flux):
    """x1 time and guidance inputs: our FLUX at (t, g) is diffusers' at (t / 1000, g / 1000) (diffusers multiplies
    both by 1000); the default scale is diffusers' own."""
    model, state = guided_flux
    config = dataclasses.replace(FluxConfig.from_dict(dict(model.config)), timestep_scale=1.0)
    net, params = load_flux(state, config)
    latents, t, cond = inputs(True)
    t = np.array([0.3, 0.85], np.float32)
    cond["guidance"] = np.array([4.0, 5.0], np.float32)
    packed = pack_latents(latents)
    grid = image_ids(LATENT[0] // 2, LATENT[1] // 2)
    ours = jax.jit(lambda p, x, s, c: net.apply(p, x, s, c, img_ids=grid))(
        params, packed, t, jax.tree.map(jnp.asarray, cond)
    )
    scaled = {**cond, "guidance": cond["guidance"] / 1000.0}
    with torch.no_grad():
        ref = torch_forward(model, packed, t / 1000.0, scaled).numpy()
        plain = torch_forward(model, packed, t, cond).numpy()
    assert rel_err(ours, ref) < 1e-4
    assert rel_err(ours, plain) > 1e-2  # the scale matters


def test_time_scale_is_a_jdistill_only_config_key():
    base = FluxConfig()
    assert "timestep_scale" not in base.to_dict()  # a teacher's config.json stays diffusers'
    own = dataclasses.replace(base, timestep_scale=1.0)
    assert own.to_dict()["timestep_scale"] == 1.0
    assert FluxConfig.from_dict(own.to_dict()) == own
    with pytest.raises(ValueError, match="timestep_scale"):
        FluxConfig.from_dict({**own.to_dict(), "timestep_scale": 0})


def _torch_meanflow(model, state, scale: float, times):
    """The exported diffusers class (jdistill/convert/meanflow_flux.py) built from ``model``'s config."""
    from jdistill.convert.meanflow_flux import MeanFlowFluxTransformer2DModel

    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    out = MeanFlowFluxTransformer2DModel(**config, timestep_scale=scale, meanflow_times=list(times)).eval()
    missing, unexpected = out.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state.items()}, strict=False
    )
    assert not unexpected and missing and all("timestep_delta_embedder" in k for k in missing)
    return out


def test_exported_meanflow_class_matches_jdistill_with_its_second_time(guided_flux):
    """jdistill's FLUX with the t - r embedder (x1 scale) and the diffusers class the export writes, given the
    same weights: equal at (t, r) where r is the next of the class's times; a time off the list is refused."""
    model, state = guided_flux
    config = dataclasses.replace(
        FluxConfig.from_dict(dict(model.config)), timestep_scale=1.0, timestep_delta_embeds=True
    )
    rng = np.random.default_rng(3)
    dim = config.inner_dim
    delta = {
        "time_text_embed.timestep_delta_embedder.linear_1.weight": 0.2 * rng.standard_normal((dim, 256)),
        "time_text_embed.timestep_delta_embedder.linear_1.bias": 0.2 * rng.standard_normal(dim),
        "time_text_embed.timestep_delta_embedder.linear_2.weight": 0.2 * rng.standard_normal((dim, dim)),
        "time_text_embed.timestep_delta_embedder.linear_2.bias": 0.2 * rng.standard_normal(dim),
    }
    full = {**state, **{k: v.astype(np.float32) for k, v in delta.items()}}
    net, params = load_flux(full, config)
    assert set(flux_state_dict(params)) == set(full)  # the embedder round-trips under its diffusers names
    times = (1.0, 0.85, 0.6, 0.3)
    theirs = _torch_meanflow(model, state, 1.0, times)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in full.items()})
    latents, _, cond = inputs(True)
    cond["guidance"] = np.array([4.5, 4.5], np.float32)
    t, r = np.array([0.85, 0.3], np.float32), np.array([0.6, 0.0], np.float32)
    packed = pack_latents(latents)
    grid = image_ids(LATENT[0] // 2, LATENT[1] // 2)
    ours = jax.jit(lambda p, x, a, b, c: net.apply(p, x, a, c, img_ids=grid, timestep_delta=a - b))(
        params, packed, t, r, jax.tree.map(jnp.asarray, cond)
    )
    kwargs = dict(
        hidden_states=torch.from_numpy(packed),
        encoder_hidden_states=torch.from_numpy(cond["encoder_hidden_states"]),
        pooled_projections=torch.from_numpy(cond["pooled_projections"]),
        img_ids=torch.tensor(grid),
        txt_ids=torch.tensor(text_ids(TEXT)),
        guidance=torch.from_numpy(cond["guidance"]),  # FluxPipeline passes the guidance scale as is
    )
    with torch.no_grad():
        ref = theirs(
            timestep=torch.from_numpy(t), **kwargs
        ).sample.numpy()  # FluxPipeline: sigma * 1000 / 1000
        with pytest.raises(ValueError, match="meanflow_times"):
            theirs(timestep=torch.tensor([0.5, 0.5]), **kwargs)
    assert rel_err(ours, ref) < 1e-4
    # r matters: the same t with r = t (delta 0) differs.
    same = jax.jit(lambda p, x, a, c: net.apply(p, x, a, c, img_ids=grid, timestep_delta=0.0 * a))(
        params, packed, t, jax.tree.map(jnp.asarray, cond)
    )
    assert rel_err(same, ref) > 1e-2


# ------------------------------------------------------------------------------------------------ (r, t) draws


def test_meanflow_time_pairs_follow_the_logit_normal():
    """(r, t) as configs/meanflow.py:flux_lite draws them: t the larger and r the smaller of two
    logit-normal(-0.4, 1) draws, r = t for 25%. Checked against the closed form: logit(t) is the max of two
    N(mu, s) (CDF Phi^2), logit(r) of the unequal pairs the min (CDF 1 - (1 - Phi)^2)."""
    from scipy import stats

    from jdistill.methods.trajectory import meanflow_times

    config = load("configs/meanflow.py:flux_lite")
    m = config.method
    n = 200_000
    r, t = jax.jit(meanflow_times, static_argnums=(1, 2, 3, 4))(
        jax.random.key(0), n, m.time_mean, m.time_std, m.ratio_r_not_t
    )
    r, t = np.asarray(r, np.float64), np.asarray(t, np.float64)
    assert (r <= t).all() and (r > 0).all() and (t < 1).all()
    equal = r == t
    assert abs(equal.mean() - 0.25) < 0.005
    phi = stats.norm(-0.4, 1.0).cdf
    logit = lambda x: np.log(x) - np.log1p(-x)  # noqa: E731
    assert stats.kstest(logit(t), lambda x: phi(x) ** 2).pvalue > 1e-3
    assert stats.kstest(logit(r[~equal]), lambda x: 1 - (1 - phi(x)) ** 2).pvalue > 1e-3
    # the t of the equal pairs is drawn like every t
    assert stats.kstest(logit(t[equal]), lambda x: phi(x) ** 2).pvalue > 1e-3


def test_second_embedder_starts_as_a_copy_of_the_first(guided_flux):
    """configs/meanflow.py:flux_lite's student: timestep_delta_embedder is timestep_embedder's copy (both
    linears, as train_meanflow.py loads the state dict), the rest the teacher's; the zero-start variant keeps
    the first linear and zeroes the last."""
    from jdistill.methods import meanflow
    from jdistill.models.net import Net

    @dataclasses.dataclass(frozen=True)
    class World:  # what building the student reads of a world
        nets: dict

    model, state = guided_flux
    net, params = load_flux(state, FluxConfig.from_dict(dict(model.config)))
    world = World({"teacher": Net("teacher", net.make, config=net.config, remake=net.remake)})
    config = load("configs/meanflow.py:flux_lite")
    network = build_network(
        "student",
        config.networks.student,
        common.with_transformer_options(world, timestep_delta_embeds=True, timestep_scale=1.0),
        10,
    )
    assert network.net.config.timestep_scale == 1.0 and network.net.config.timestep_delta_embeds
    for whole in (True, False):
        init = meanflow.copy_with_delta_embedder(network, whole=whole)
        if not whole:
            init = meanflow.start_as_teacher(init)
        student = init.init(jax.random.key(0), {"teacher": params})
        embed = student["time_text_embed"]
        first, second = embed["timestep_embedder"], embed["timestep_delta_embedder"]
        np.testing.assert_array_equal(
            second["linear_1"]["kernel"], params["time_text_embed"]["timestep_embedder"]["linear_1"]["kernel"]
        )
        np.testing.assert_array_equal(second["linear_1"]["bias"], first["linear_1"]["bias"])
        if whole:
            np.testing.assert_array_equal(second["linear_2"]["kernel"], first["linear_2"]["kernel"])
            np.testing.assert_array_equal(second["linear_2"]["bias"], first["linear_2"]["bias"])
        else:
            assert not np.any(second["linear_2"]["kernel"]) and not np.any(second["linear_2"]["bias"])
        rest = {k: v for k, v in student.items() if k != "time_text_embed"}
        assert _leaves_equal(rest, {k: v for k, v in params.items() if k != "time_text_embed"})


# ------------------------------------------------------------------------------------------------ acceptance


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """A tiny FLUX.1-lite-like pipeline (FLUX transformer with a guidance embedding, T5 and CLIP encoders, a
    16-channel VAE, FLUX's dynamic-shift scheduler) and a prompt file."""
    root = tmp_path_factory.mktemp("t2i_distill")
    (root / "prompts.txt").write_text("\n".join([*PROMPTS, "green of the square", "an 8"]) + "\n")
    return {"path": tiny_flow_pipeline.save_flux_pipeline(root / "lite"), "prompts": root / "prompts.txt"}


def _overrides(lite, images, num_steps: int) -> list[tuple[str, str]]:
    """Only what the acceptance allows: teacher path, prompts and data, resolution, batch and step count (and
    the fsdp split of the 8 fake devices)."""
    return [
        ("teacher.path", str(lite["path"])),
        ("teacher.prompts", str(lite["prompts"])),
        ("teacher.data", str(images)),
        ("teacher.resolution", "16"),
        ("batch_size", "8"),
        ("num_steps", str(num_steps)),
        ("mesh.fsdp", "2"),
    ]


def _main(spec: str, workdir, overrides) -> None:
    """``python -m jdistill.main --config spec --workdir workdir --config.k=v ...`` on 8 fake CPU devices (with
    the test session's XLA flags and compilation cache)."""
    env = subprocess_env(8)
    env["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"  # see conftest.py
    # The preset's step (split per update, bfloat16) still stopped in all-gather / all-reduce rendezvous with
    # XLA:CPU's default thread pool (one per core: 2 here), in 2 of 3 runs; a pool far larger than the 8 fake
    # devices leaves a thread for every device that has not reached the collective yet. The straight and
    # resumed runs share these settings, so the bit-exact comparison holds.
    env["PJRT_NPROC"] = "64"
    env["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    env["JAX_COMPILATION_CACHE_DIR"] = str(CACHE_DIR)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    cmd = main_command(workdir, spec, overrides)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _train_and_resume(spec: str, lite, images, tmp_path):
    """Two steps straight, and one step then a resumed run to two: equal bit for bit. Returns (the run's
    config, its resumed workdir)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _main(spec, straight, _overrides(lite, images, 2))
    _main(spec, resumed, _overrides(lite, images, 1))
    _main(spec, resumed, _overrides(lite, images, 2))
    config = load(spec, _overrides(lite, images, 2))
    assert config.teacher.kind == "flow" and config.teacher.preset == "flux_lite"
    logged = logged_metrics(resumed)
    assert [m["step"] for m in logged if "steps_per_sec" in m] == [1, 2]
    assert all(np.isfinite(m["student/loss"]) for m in logged if "student/loss" in m)
    _, state, step = train.restore_latest(config, str(resumed))
    _, state_straight, _ = train.restore_latest(config, str(straight))
    assert step == 2 and _leaves_equal(state, state_straight), "the resumed run differs from the straight one"
    return config, resumed


FLOAT32 = [("teacher.dtype", "float32"), ("teacher.param_dtype", "float32")]


def _diffusers_equals_jdistill(spec, lite, images, workdir, dst, monkeypatch, extra=(), **load_kwargs):
    """Export the run (with ``extra`` sampling overrides), then sample the same prompts from the same draws with
    jdistill (its sampler in float32: the preset's frozen networks compute in bfloat16) and with the exported
    pipeline as its record says; returns the record."""
    overrides = [*_overrides(lite, images, 2), *extra]
    export.export_run(load(spec, overrides), str(workdir), str(dst))
    record = json.loads((dst / "jdistill_export.json").read_text())
    assert record["step"] == 2
    config = load(spec, [*overrides, *FLOAT32])
    s, state, _ = train.restore_latest(config, str(workdir))
    params = train.sampling_params(s, state)
    key = jax.random.key(11)
    cond = jax.jit(s.world.prepare)(params, s.world.conditions.tokenize(PROMPTS))["cond"]
    ours = np.asarray(jax.jit(s.recipe.sample)(params, cond, key))
    z, noises = _draws(s, config, key, ours.shape)
    kind, theirs = pipeline_latents(
        dst, "flux_lite", z, record["call"], noises, None, monkeypatch, **load_kwargs
    )
    assert kind == "FluxPipeline" and np.isfinite(theirs).all()
    want = to_pipeline_layout("flux_lite", ours)
    err = rel_err(theirs, want)
    print(f"{spec} {record['call']}: diffusers vs jdistill, max abs difference / max abs = {err:.2e}")
    assert err < 1e-4, err  # measured 3e-6 to 5e-6
    return record


@pytest.mark.e2e
def test_scm_flux_lite_runs_resumes_and_samples_in_plain_flux_pipeline(lite, images, tmp_path, monkeypatch):
    """configs/scm.py:flux_lite as a user runs it; the x1-scale student in plain FluxPipeline: one step, and two
    with the intermediate TrigFlow time 1.3 passed as sigmas (its flow time), from jdistill's own draws."""
    spec = "configs/scm.py:flux_lite"
    config, workdir = _train_and_resume(spec, lite, images, tmp_path)
    assert config.networks.student.model.timestep_scale == 1.0 and config.method.guidance_embed
    one = _diffusers_equals_jdistill(spec, lite, images, workdir, tmp_path / "one", monkeypatch)
    assert one["call"]["num_inference_steps"] == 1
    assert one["call"]["guidance_scale"] == pytest.approx(4.5 / 1000)  # w = 4.5, embedded x1
    scheduler = json.loads((tmp_path / "one" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["num_train_timesteps"] == 1 and not scheduler["use_dynamic_shifting"]
    transformer = json.loads((tmp_path / "one" / "transformer" / "config.json").read_text())
    assert transformer["_class_name"] == "FluxTransformer2DModel" and "timestep_scale" not in transformer
    two = _diffusers_equals_jdistill(
        spec,
        lite,
        images,
        workdir,
        tmp_path / "two",
        monkeypatch,
        extra=[("method.student_timesteps", f"({math.pi / 2!r}, 1.3)")],
    )
    s13 = math.sin(1.3) / (
        math.sin(1.3) + math.cos(1.3)
    )  # the same noise-to-data ratio (sigma_d = data scale)
    assert two["call"]["sigmas"] == pytest.approx([1.0, s13], rel=1e-6)


@pytest.mark.e2e
def test_meanflow_flux_lite_runs_resumes_and_samples_with_its_second_embedder(
    lite, images, tmp_path, monkeypatch
):
    """configs/meanflow.py:flux_lite as a user runs it; the student exported with its t - r embedder (the
    MeanFlowFluxTransformer2DModel module in the export) draws in FluxPipeline what jdistill's four-step sampler
    draws, at the teacher pipeline's shifted times."""
    spec = "configs/meanflow.py:flux_lite"
    config, workdir = _train_and_resume(spec, lite, images, tmp_path)
    assert (
        config.networks.student.model.timestep_delta_init == "copy" and config.method.mix_delta == "interval"
    )
    record = _diffusers_equals_jdistill(
        spec, lite, images, workdir, tmp_path / "export", monkeypatch, trust_remote_code=True
    )
    times = record["call"]["sigmas"]
    # FLUX's dynamic shift at 16 px (4x4 packed tokens): k = exp(mu), s -> k s / (1 + (k - 1) s)
    mu = 0.5 + (16 - 256) * (1.15 - 0.5) / (4096 - 256)
    k = math.exp(mu)
    assert times == pytest.approx([k * s / (1 + (k - 1) * s) for s in (1.0, 0.75, 0.5, 0.25)], rel=1e-5)
    transformer = json.loads((tmp_path / "export" / "transformer" / "config.json").read_text())
    assert transformer["_class_name"] == "MeanFlowFluxTransformer2DModel"
    assert transformer["meanflow_times"] == times and transformer["timestep_scale"] == 1.0
    assert record["call"]["guidance_scale"] == pytest.approx(3.5)  # the class embeds it x1 itself


# ------------------------------------------------------------------------------------------------ real size


@pytest.mark.parametrize("recipe", ["scm", "meanflow"])
def test_flux_lite_presets_plan_at_real_size_with_every_parameter_split(recipe):
    """The presets as written (512 px, T5 256, bfloat16 frozen networks, x1 student) planned abstractly for
    FLUX.1-lite-8B under fsdp=8: the student is the teacher's transformer (MeanFlow: plus the t - r embedder,
    two 256 -> 3072 -> 3072 linears) and every large parameter is split."""
    from test_plan_flow import FSDP8, QUIET, meta_count

    from jdistill import plan

    result = plan.plan(load(f"configs/{recipe}.py:flux_lite", FSDP8), **QUIET)
    assert result["sample_shape"] == [64, 64, 16]  # 512 px
    assert result["conditioning"] == {"encoder_hidden_states": [256, 4096], "pooled_projections": [768]}
    nets = result["networks"]
    count = meta_count("flux_lite", "transformer")
    extra = (256 * 3072 + 3072) + (3072 * 3072 + 3072) if recipe == "meanflow" else 0
    assert nets["teacher"]["params"] == count and nets["student"]["params"] == count + extra
    for name, net in nets.items():
        if name != "logvar":
            assert net["replicated_fraction"] < 2e-3, (name, net["replicated"][:5])
