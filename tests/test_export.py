"""Export to diffusers: the scheduler that reproduces the student's sampler, the written pipeline loading in
diffusers' own StableDiffusion(XL)Pipeline and generating what jdistill's sampler generates, bit-identical
round trips of the weights, and tools/export_diffusers.py on a trained run."""

from __future__ import annotations

import filecmp
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import tool
from test_pipeline import tiny_config

from jdistill import train
from jdistill.convert.converted import convert_pipeline
from jdistill.convert.core import to_state_dict
from jdistill.convert.export import LCM_TIMESTEP_SCALING, export_pipeline, one_step_fold, scheduler_plan
from jdistill.diffusion.denoiser import NetworkDenoiser
from jdistill.diffusion.parameterization import to_prediction
from jdistill.diffusion.schedules import VPSchedule
from jdistill.rng import streams
from jdistill.teachers import build_world

TEACHER_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.42.1",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def _x0_and_output(prediction: str, t: int, seed: int = 0):
    """A random sample x_t, x0 and the model output that encodes them in ``prediction`` (our conversions)."""
    schedule = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000)
    rng = np.random.default_rng(seed)
    x_t = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    x0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    tt = jnp.full((2,), float(t))
    pred = to_prediction(jnp.asarray(x0), "x0", jnp.asarray(x_t), schedule, tt)
    return x_t, x0, np.array(pred.as_type(prediction))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_one_step_scheduler_returns_x0_exactly(prediction):
    from diffusers import DDIMScheduler

    config, call, _ = scheduler_plan(TEACHER_SCHEDULER, prediction, (999.0,))
    assert config["_class_name"] == "DDIMScheduler" and call == {"num_inference_steps": 1}
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    x_t, x0, out = _x0_and_output(prediction, 999)
    prev = scheduler.step(torch.from_numpy(out), 999, torch.from_numpy(x_t)).prev_sample.numpy()
    # Only the parameterization conversion's float32 rounding separates them (|x0| ~ 3, sqrt(abar) ~ 0.07).
    np.testing.assert_allclose(prev, x0, atol=2e-5)


def _sigma(t: int) -> float:
    return float(np.sqrt(1 - VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000).alphas_cumprod[t]))


@pytest.mark.parametrize(
    ("prediction", "t", "noised_zero"),
    [("eps", 625, True), ("v", 625, True), ("x0", 625, True), ("eps", 399, False), ("eps", 999, True)],
)
def test_one_step_fold_runs_other_timesteps_and_inputs_in_one_ddim_step(prediction, t, noised_zero):
    """A student at timestep t from latents s z (SiD-LSG: s = sigma_t), called with num_inference_steps=1 on
    z: DDIM's step on the folded output (conv_out x f) is the student's x0 computed by our conversions."""
    from diffusers import DDIMScheduler

    scale = _sigma(t) if noised_zero else 1.0
    config, call, fold = scheduler_plan(TEACHER_SCHEDULER, prediction, (float(t),), input_scale=scale)
    assert fold == one_step_fold(TEACHER_SCHEDULER, prediction, t, scale)
    assert config["_class_name"] == "DDIMScheduler" and call == {"num_inference_steps": 1}
    assert fold.conv_in == scale and (fold.conv_out == 1.0) == (prediction == "x0" or not noised_zero)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [t]
    schedule = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000)
    rng = np.random.default_rng(t)
    z, f = rng.standard_normal((2, 2, 4, 8, 8)).astype(np.float32)
    x_in, tt = jnp.asarray(scale * z), jnp.full((2,), float(t))
    x0 = np.asarray(to_prediction(jnp.asarray(f), prediction, x_in, schedule, tt).as_type("x0"))
    prev = scheduler.step(torch.from_numpy(fold.conv_out * f), t, torch.from_numpy(z)).prev_sample.numpy()
    np.testing.assert_allclose(prev, x0, atol=2e-6 * np.abs(x0).max())


def test_one_step_fold_declines_where_it_cannot():
    # eps from sigma_100 z: sqrt(a) = alpha_100 / sigma_100 > 1, so the timesteps=[T] call and latents_scale stay.
    assert one_step_fold(TEACHER_SCHEDULER, "eps", 100, _sigma(100)) is None
    config, call, _ = scheduler_plan(TEACHER_SCHEDULER, "eps", (100.0,), input_scale=_sigma(100))
    assert config["_class_name"] == "LCMScheduler" and call == {"timesteps": [100]}
    cosine = {**TEACHER_SCHEDULER, "beta_schedule": "squaredcos_cap_v2"}
    assert one_step_fold(cosine, "eps", 625, _sigma(625)) is None
    assert one_step_fold(cosine, "eps", 999) is not None  # the teacher's own last step needs no betas


@pytest.mark.parametrize(("prediction", "timesteps"), [("eps", (999, 749, 499, 249)), ("v", (999, 500))])
def test_few_step_scheduler_predicts_x0_and_renoises(prediction, timesteps):
    from diffusers import LCMScheduler

    config, call, _ = scheduler_plan(TEACHER_SCHEDULER, prediction, tuple(float(t) for t in timesteps))
    assert config["_class_name"] == "LCMScheduler" and config["timestep_scaling"] == LCM_TIMESTEP_SCALING
    default = timesteps == (999, 749, 499, 249)
    assert call == ({"num_inference_steps": 4} if default else {"timesteps": list(timesteps)})
    scheduler = LCMScheduler.from_config(config)
    scheduler.set_timesteps(**call)
    assert scheduler.timesteps.tolist() == list(timesteps)
    for i, t in enumerate(timesteps):
        x_t, x0, out = _x0_and_output(prediction, t, seed=i)
        step = scheduler.step(
            torch.from_numpy(out), t, torch.from_numpy(x_t), generator=torch.Generator().manual_seed(0)
        )
        np.testing.assert_allclose(step.denoised.numpy(), x0, atol=2e-5)
        if i + 1 < len(timesteps):  # re-noised to the next timestep: x0 plus fresh noise at that level
            abar = float(scheduler.alphas_cumprod[timesteps[i + 1]])
            noise = (step.prev_sample.numpy() - np.sqrt(abar) * step.denoised.numpy()) / np.sqrt(1 - abar)
            assert abs(noise.std() - 1) < 0.15 and abs(noise.mean()) < 0.15
        else:
            np.testing.assert_array_equal(step.prev_sample.numpy(), step.denoised.numpy())


def test_scheduler_rules_for_other_students():
    config, call, _ = scheduler_plan(TEACHER_SCHEDULER, "v", ())
    assert config == {**TEACHER_SCHEDULER, "prediction_type": "v_prediction"} and call == {}
    with pytest.raises(ValueError, match="not integers"):
        scheduler_plan(TEACHER_SCHEDULER, "eps", (999.5,))
    with pytest.raises(ValueError, match="cannot export a student predicting 'velocity'"):
        scheduler_plan(TEACHER_SCHEDULER, "velocity", (999.0,))


def _pipeline_latents(pipe_dir, prompts, z_nhwc, call, side, lora_dir=None):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    latents = torch.from_numpy(np.asarray(z_nhwc).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = pipe(prompts, latents=latents, output_type="latent", height=side, width=side, **call).images
    return type(pipe).__name__, out.numpy().transpose(0, 2, 3, 1)


def _read_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_sdxl_export_generates_like_jdistill_and_round_trips(tiny_pipelines, tmp_path):
    """No training: the teacher itself exported as a one-step "student" (same architecture, same weights)."""
    config = tiny_config(tiny_pipelines, "sdxl")
    world = build_world(config)
    dst = tmp_path / "xl"
    record = export_pipeline(
        world.source, str(dst), world.frozen["teacher"], prediction="eps", timesteps=(999.0,), info={"k": 1}
    )
    assert record["call"] == {"num_inference_steps": 1, "guidance_scale": 1.0} and record["k"] == 1
    # Round trip: diffusers state dict -> Flax -> exported state dict, bit-identical key for key.
    src_unet = _read_safetensors(tiny_pipelines["sdxl"] / "unet" / "diffusion_pytorch_model.safetensors")
    out_unet = _read_safetensors(dst / "unet" / "diffusion_pytorch_model.safetensors")
    assert src_unet.keys() == out_unet.keys()
    assert all(torch.equal(src_unet[k], out_unet[k]) for k in src_unet)
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):  # copied as they were
        same = filecmp.dircmp(tiny_pipelines["sdxl"] / name, dst / name)
        assert not same.diff_files and not same.left_only and not same.right_only, name

    prompts = ["a red circle", "the digit 3"]
    z = jax.random.normal(jax.random.key(1), (2, *world.sample_shape))
    cond = jax.jit(world.prepare)(world.frozen, world.conditions.tokenize(prompts))["cond"]
    teacher = NetworkDenoiser(world.nets["teacher"], "eps", world.teacher.schedule)
    ours = np.asarray(teacher.predict(world.frozen["teacher"], z, jnp.full((2,), 999.0), cond).x0)
    side = config.teacher.resolution
    kind, theirs = _pipeline_latents(dst, prompts, z, record["call"], side)
    assert kind == "StableDiffusionXLPipeline"
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-5

    # From a converted (Flax) teacher directory, the VAE and encoders are written from Flax: same pipeline.
    converted = tmp_path / "converted"
    convert_pipeline(str(tiny_pipelines["sdxl"]), str(converted))
    export_pipeline(
        str(converted), str(tmp_path / "xl2"), world.frozen["teacher"], prediction="eps", timesteps=(999.0,)
    )
    _, again = _pipeline_latents(tmp_path / "xl2", prompts, z, record["call"], side)
    np.testing.assert_allclose(again, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())
    with pytest.raises(FileExistsError, match="not empty"):
        export_pipeline(world.source, str(dst), world.frozen["teacher"], prediction="eps")


def test_folded_one_step_export_generates_like_jdistill(tiny_pipelines, tmp_path):
    """SiD-LSG's one-step sampler (sigma_625 z labelled 625) exported for a plain num_inference_steps=1 call:
    the pipeline, fed z, returns what jdistill's sampler returns from sigma_625 z."""
    from jdistill.methods.rollout import FewStepStudent

    config = tiny_config(tiny_pipelines, "sd")
    world = build_world(config)
    student = FewStepStudent(world.teacher, world.sample_shape, (625.0,), "noised_zero")
    record = export_pipeline(
        world.source,
        str(tmp_path / "sd"),
        world.frozen["teacher"],
        prediction="eps",
        timesteps=(625.0,),
        input_scale=student.input_scale,
    )
    assert (
        record["call"] == {"num_inference_steps": 1, "guidance_scale": 1.0} and record["latents_scale"] == 1.0
    )
    written = _read_safetensors(tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    original = to_state_dict(jax.tree.map(np.asarray, world.frozen["teacher"]))
    for key, factor in record["unet_folded"].items():  # the trained weights are recovered by dividing
        np.testing.assert_allclose(written[key].numpy() / factor, original[key], rtol=1e-6)
    assert torch.equal(written["conv_in.bias"], torch.from_numpy(original["conv_in.bias"]))

    prompts = ["a red circle", "the digit 3"]
    key = jax.random.key(3)
    cond = jax.jit(world.prepare)(world.frozen, world.conditions.tokenize(prompts))["cond"]
    ours = np.asarray(student.sample(world.frozen["teacher"], cond, key))  # from sigma_625 z
    z = world.teacher.schedule.prior_sample(streams(key, "latent", "renoise")["latent"], ours.shape)
    kind, theirs = _pipeline_latents(tmp_path / "sd", prompts, z, record["call"], config.teacher.resolution)
    assert kind == "StableDiffusionPipeline"
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-5


def test_exported_run_loads_in_diffusers_and_generates_like_jdistill(tiny_pipelines, tmp_path, capsys):
    """Train two swiftbrush steps on the tiny SD pipeline, export with the tool, generate with diffusers."""
    config = tiny_config(tiny_pipelines, "sd", ("num_steps", "2"), ("checkpoint.every", "2"))
    workdir = tmp_path / "run"
    train.train(config, str(workdir))
    exporter = tool("export_diffusers")
    dst = tmp_path / "export"
    assert exporter.main(["--workdir", str(workdir), "--dst", str(dst)]) == 0
    assert "num_inference_steps': 1" in capsys.readouterr().out
    record = json.loads((dst / "jdistill_export.json").read_text())
    assert record["method"] == "swiftbrush" and record["step"] == 2 and record["scheduler"] == "DDIMScheduler"

    s, state, _ = train.restore_latest(load_run(workdir), str(workdir))
    params = train.sampling_params(s, state)
    exported = {
        k: v.numpy()
        for k, v in _read_safetensors(dst / "unet" / "diffusion_pytorch_model.safetensors").items()
    }
    expected = to_state_dict(jax.tree.map(np.asarray, params["student"]))
    assert exported.keys() == expected.keys()
    assert all(np.array_equal(exported[k], expected[k]) for k in expected)
    teacher_unet = _read_safetensors(tiny_pipelines["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not np.array_equal(exported[k], teacher_unet[k].numpy()) for k in expected), (
        "the student trained"
    )

    # jdistill's own sampler and diffusers' pipeline, from the same initial latents.
    prompts = ["a red circle", "a blue square on a green field"]
    key = jax.random.key(7)
    cond = jax.jit(s.world.prepare)(params, s.world.conditions.tokenize(prompts))["cond"]
    ours = np.asarray(jax.jit(s.recipe.sample)(params, cond, key))
    z = s.world.teacher.schedule.prior_sample(streams(key, "latent", "renoise")["latent"], ours.shape)
    kind, theirs = _pipeline_latents(dst, prompts, z, record["call"], config.teacher.resolution)
    assert kind == "StableDiffusionPipeline"
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-5

    # 16-bit export of the same run.
    assert (
        exporter.main(["--workdir", str(workdir), "--dst", str(tmp_path / "half"), "--dtype", "bfloat16"])
        == 0
    )
    half = _read_safetensors(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in half.values()} == {torch.bfloat16}
    assert exporter.main(["--workdir", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "x")]) == 1
    assert "config.json does not exist" in capsys.readouterr().err


def load_run(workdir):
    from jdistill.configuration import load_run_config

    return load_run_config(str(workdir))
