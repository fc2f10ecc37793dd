"""Exporting FLUX / SD3 transformer students to FluxPipeline / StableDiffusion3Pipeline directories: the
pipeline, called as the export record says, draws what jdistill's student sampler draws from the same noise
(one step, and several steps with the same re-noising draws); the transformer round-trips bit-exactly; an
unmerged LoRA loads with ``load_lora_weights``; a converted (Flax) teacher exports too."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_flow_pipeline
import torch
from safetensors.torch import load_file

from jdistill.convert.export import component_state_dict
from jdistill.convert.export_flow import export_flow_pipeline, flow_scheduler_plan
from jdistill.methods.rollout import FewStepStudent
from jdistill.models.flux import pack_latents
from jdistill.rng import streams
from jdistill.teachers import build_world
from jdistill.teachers.flow_world import flow_teacher_config

PROMPTS = ["a red circle", "the digit 3 on a blue square"]
CLASSES = {"flux_dev": "FluxTransformer2DModel", "sd35_medium": "SD3Transformer2DModel"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    pipelines = tiny_flow_pipeline.save_flow_pipelines(tmp_path_factory.mktemp("flow_export"), PROMPTS)
    out = {}
    for preset in ("flux_dev", "sd35_medium"):
        t = flow_teacher_config(preset)
        t.update(path=str(pipelines[preset]), prompts=str(pipelines["prompts"]), resolution=16)
        out[preset] = build_world(ml_config(t))
    return out


def ml_config(teacher):
    import ml_collections

    return ml_collections.ConfigDict({"seed": 0, "teacher": teacher})


def to_pipeline_layout(preset: str, x: np.ndarray) -> np.ndarray:
    """NHWC latents -> FLUX's packed tokens or SD3's NCHW."""
    if preset.startswith("flux"):
        return np.asarray(pack_latents(jnp.asarray(x)))
    return np.asarray(x).transpose(0, 3, 1, 2)


def pipeline_latents(dst, preset, z_nhwc, call, noises=(), lora_dir=None, monkeypatch=None, **load):
    """The exported pipeline's output latents (in jdistill's layout to compare) from initial noise ``z``; the
    flow scheduler's re-noising draws are replaced by ``noises`` (NHWC, in order; both samplers draw at the last
    step too, where the noise level is 0). ``load``: more arguments of ``from_pretrained``."""
    from diffusers import DiffusionPipeline
    from diffusers.schedulers import scheduling_flow_match_euler_discrete as flow_scheduler

    if len(call.get("sigmas", ())) < 2:
        noises = ()  # a deterministic Euler step draws nothing
    queue = [torch.from_numpy(to_pipeline_layout(preset, n).copy()) for n in noises]
    if monkeypatch is not None:
        monkeypatch.setattr(flow_scheduler, "randn_tensor", lambda shape, **_: queue.pop(0))
    pipe = DiffusionPipeline.from_pretrained(str(dst), **load)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    latents = torch.from_numpy(to_pipeline_layout(preset, z_nhwc).copy())
    with torch.no_grad():
        out = pipe(PROMPTS, latents=latents, output_type="latent", height=16, width=16, **call).images.numpy()
    assert not queue, "every re-noising draw used"
    return type(pipe).__name__, out


def student_sample(world, params, timesteps, key):
    """jdistill's few-step sampler with the world's denoiser, and its initial and re-noising draws."""
    student = FewStepStudent(world.teacher, world.sample_shape, timesteps)
    cond = jax.jit(world.prepare)(world.frozen, world.conditions.tokenize(PROMPTS))["cond"]
    ours = np.asarray(jax.jit(student.sample)(params, cond, key))
    k = streams(key, "latent", "renoise")
    z = np.asarray(world.teacher.schedule.prior_sample(k["latent"], ours.shape))
    keys = jax.random.split(k["renoise"], len(timesteps))
    noises = [np.asarray(jax.random.normal(keys[i], ours.shape, jnp.float32)) for i in range(len(timesteps))]
    return ours, z, noises


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("preset", ["flux_dev", "sd35_medium"])
@pytest.mark.parametrize("timesteps", [(1.0,), (1.0, 0.6, 0.25)], ids=["1step", "3step"])
def test_exported_student_samples_as_jdistill(worlds, preset, timesteps, tmp_path, monkeypatch):
    """The teacher's transformer exported as a student: same draws in, same latents out (float32, 1e-4)."""
    world = worlds[preset]
    params = world.frozen["teacher"]
    state = component_state_dict(CLASSES[preset], jax.tree.map(np.asarray, params))
    record = export_flow_pipeline(
        world.source, str(tmp_path / "out"), state, timesteps=timesteps, max_sequence_length=world_t5(preset)
    )
    assert record["call"]["guidance_scale"] == 1.0
    assert ("sigmas" in record["call"]) == (len(timesteps) > 1)
    written = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    original = load_file(world.source + "/transformer/diffusion_pytorch_model.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)

    ours, z, noises = student_sample(world, params, timesteps, jax.random.key(5))
    kind, theirs = pipeline_latents(
        tmp_path / "out", preset, z, record["call"], noises, monkeypatch=monkeypatch
    )
    assert kind == {"flux_dev": "FluxPipeline", "sd35_medium": "StableDiffusion3Pipeline"}[preset]
    assert np.isfinite(theirs).all()
    assert rel(theirs, to_pipeline_layout(preset, ours)) < 1e-4


def world_t5(preset: str) -> int:
    from jdistill.teachers.presets import FlowTeacherPreset, get_preset

    return get_preset(preset, FlowTeacherPreset).t5_length


def test_lora_student_exports_as_peft_file_and_merged(worlds, tmp_path, monkeypatch):
    """A random LoRA on the FLUX transformer's attention: the pipeline with ``load_lora_weights`` and the
    merged export both draw what jdistill's LoRA student draws."""
    from jdistill.models.lora import LoRAConfig, LoRANet, lora_state_dict, merge_lora

    world = worlds["flux_dev"]
    config = LoRAConfig(rank=2, alpha=4.0, targets=("to_q", "to_k", "to_v", "to_out.0"))
    lora_net = LoRANet("student", world.nets["teacher"], config)
    rng = np.random.default_rng(0)
    lora = jax.tree.map(
        lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32), lora_net.abstract
    )
    base = jax.tree.map(np.asarray, world.frozen["teacher"])
    merged = merge_lora(base, lora, config)
    cls = CLASSES["flux_dev"]
    kwargs = {"timesteps": (1.0,), "max_sequence_length": world_t5("flux_dev")}
    peft = lora_state_dict(lora, config, "transformer.")
    assert any(".transformer_blocks.0." in k for k in peft) and any(
        ".single_transformer_blocks.1." in k for k in peft
    )
    export_flow_pipeline(
        world.source, str(tmp_path / "lora"), component_state_dict(cls, base), lora_state=peft, **kwargs
    )
    record = export_flow_pipeline(
        world.source, str(tmp_path / "merged"), component_state_dict(cls, merged), **kwargs
    )

    ours, z, _ = student_sample(world, merged, (1.0,), jax.random.key(2))
    want = to_pipeline_layout("flux_dev", ours)
    _, with_lora = pipeline_latents(
        tmp_path / "lora", "flux_dev", z, record["call"], lora_dir=tmp_path / "lora"
    )
    _, from_merged = pipeline_latents(tmp_path / "merged", "flux_dev", z, record["call"])
    _, plain = pipeline_latents(tmp_path / "lora", "flux_dev", z, record["call"])
    assert rel(with_lora, want) < 1e-4 and rel(from_merged, want) < 1e-4
    assert rel(plain, want) > 1e-2  # the adapters matter


def test_sd3_lora_keys_follow_the_checkpoint_numbering(worlds):
    """SD3.5's dual-attention blocks are a separate stack in jdistill; the LoRA file numbers them as diffusers."""
    from jdistill.convert.sd3 import block_runs, to_checkpoint_key
    from jdistill.models.lora import LoRAConfig, LoRANet, lora_state_dict

    world = worlds["sd35_medium"]
    config = LoRAConfig(rank=2, alpha=2.0, targets=("to_q",))
    net = LoRANet("student", world.nets["teacher"], config)
    lora = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), net.abstract)
    params = world.frozen["teacher"]
    keys = set(lora_state_dict(lora, config, "transformer.", to_checkpoint_key(*block_runs(params))))
    state = component_state_dict(CLASSES["sd35_medium"], jax.tree.map(np.asarray, params))
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in keys}
    assert modules == {k.removesuffix(".weight") for k in state if k.endswith(".to_q.weight")}


def test_flow_scheduler_plan_and_refusals(worlds, tmp_path):
    teacher = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True}
    scheduler, call = flow_scheduler_plan(teacher, (0.8, 0.4))
    assert (
        scheduler["shift"] == 1.0
        and not scheduler["use_dynamic_shifting"]
        and scheduler["stochastic_sampling"]
    )
    assert call == {"sigmas": [0.8, 0.4]}
    assert flow_scheduler_plan(teacher, ()) == (teacher, {})
    with pytest.raises(ValueError, match="not decreasing flow times"):
        flow_scheduler_plan(teacher, (999.0,))
    world = worlds["sd35_medium"]
    state = component_state_dict(CLASSES["sd35_medium"], jax.tree.map(np.asarray, world.frozen["teacher"]))
    with pytest.raises(ValueError, match="no guidance embedding"):
        export_flow_pipeline(world.source, str(tmp_path / "g"), state, timesteps=(1.0,), guidance=3.0)
    with pytest.raises(Exception, match="not a pipeline directory"):
        export_flow_pipeline(str(tmp_path), str(tmp_path / "x"), state)


def test_converted_teacher_exports_its_components_as_torch_weights(worlds, tmp_path):
    """From a directory made by tools/convert_teacher.py (Flax checkpoints), the text encoders (T5 included)
    and the VAE are written as transformers/diffusers weights equal to the original files."""
    from helpers import tool

    world = worlds["sd35_medium"]
    converted = tmp_path / "converted"
    assert tool("convert_teacher").main(["--src", world.source, "--dst", str(converted)]) == 0
    state = component_state_dict(CLASSES["sd35_medium"], jax.tree.map(np.asarray, world.frozen["teacher"]))
    export_flow_pipeline(str(converted), str(tmp_path / "out"), state, timesteps=(1.0,))
    for name, stem in [
        ("text_encoder_3", "model"),
        ("text_encoder", "model"),
        ("vae", "diffusion_pytorch_model"),
    ]:
        written = load_file(tmp_path / "out" / name / f"{stem}.safetensors")
        original = load_file(f"{world.source}/{name}/{stem}.safetensors")
        if "encoder.embed_tokens.weight" in written:  # T5's tied embedding, which save_pretrained leaves out
            assert torch.equal(written.pop("encoder.embed_tokens.weight"), written["shared.weight"])
        assert written.keys() == original.keys(), name
        assert all(torch.equal(written[k].float(), original[k].float()) for k in original), name
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
