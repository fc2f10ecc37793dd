"""The flow-teacher world (teacher.kind = "flow") on tiny FLUX and SD3.5-style pipelines: networks, latent
shape, prompt conditioning through the world's sources and ``prepare``, the unconditional input, and a
guided teacher sample through jdistill's flow sampler that equals the diffusers pipeline called with the same
prompts and noise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_flow_pipeline
import torch
from helpers import logged_metrics
from tiny_pipeline import TOKEN_LENGTH

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.samplers import flux_sigmas, ode_plan, run_sampler
from jdistill.diffusion.schedules import flux_mu
from jdistill.models.flux import pack_latents
from jdistill.teachers import build_world
from jdistill.teachers.flow_world import flow_teacher_config

PROMPTS = ["a red circle", "the digit 3 on a blue square", "green of the square", "an 8"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    return tiny_flow_pipeline.save_flow_pipelines(tmp_path_factory.mktemp("flow_world"), PROMPTS)


def config(preset: str, pipelines, **teacher) -> ml_collections.ConfigDict:
    t = flow_teacher_config(preset)
    t.update(path=str(pipelines[preset]), prompts=str(pipelines["prompts"]), resolution=16, **teacher)
    return ml_collections.ConfigDict({"seed": 0, "teacher": t})


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("preset", ["flux_dev", "sd35_medium"])
def test_world_builds_and_samples_as_the_pipeline(preset, pipelines):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    flux = preset == "flux_dev"
    world = build_world(config(preset, pipelines))
    assert world.sample_shape == (8, 8, 16)  # 16 px, VAE factor 2, 16 latent channels
    expected = {"teacher", "vae", "text_encoder", "text_encoder_2"} | (set() if flux else {"text_encoder_3"})
    assert set(world.frozen) == set(world.nets) == expected
    batch = world.prepare(world.frozen, jax.tree.map(jnp.asarray, world.eval_batch(2)))
    cond = batch["cond"]
    t5_len = 512 if flux else TOKEN_LENGTH + 256  # SD3: the CLIP tokens (77 in the real model), then T5
    assert cond["encoder_hidden_states"].shape[:2] == (2, t5_len)
    assert cond["pooled_projections"].shape == (2, 32 if flux else 64)
    assert jax.tree.map(np.shape, world.uncond) == jax.tree.map(lambda a: (1, *a.shape[1:]), cond)

    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
    steps, scale = 2, 3.5
    plan = ode_plan(world.teacher.schedule, steps)  # the pipeline's steps: FLUX's dynamic shift at 16 tokens
    if flux:
        np.testing.assert_allclose(plan.timesteps, flux_sigmas(steps, mu=flux_mu(16)), rtol=1e-12)

    def denoise(x, t):
        return predict_cfg(world.teacher, world.frozen["teacher"], x, t, cond, world.uncond, scale)

    ours = np.asarray(jax.jit(lambda x: run_sampler(denoise, x, plan))(jnp.asarray(latents)))
    prompts = PROMPTS[:2]
    # The pipelines' own latent layouts: FLUX's packed tokens, SD3's NCHW.
    if flux:
        pipeline, options = FluxPipeline, {"max_sequence_length": 512}
        theirs_in, ours = (np.asarray(pack_latents(jnp.asarray(a))) for a in (latents, ours))
    else:
        pipeline, options = (
            StableDiffusion3Pipeline,
            {"negative_prompt": ["", ""], "max_sequence_length": 256},
        )
        theirs_in, ours = (a.transpose(0, 3, 1, 2).copy() for a in (latents, ours))
    with torch.no_grad():
        want = pipeline.from_pretrained(str(pipelines[preset]))(
            prompt=prompts,
            latents=torch.from_numpy(theirs_in),
            height=16,
            width=16,
            num_inference_steps=steps,
            guidance_scale=scale,
            output_type="latent",
            **options,
        ).images.numpy()
    assert rel(ours, want) < 1e-4


def test_kind_and_preset_must_agree(pipelines):
    wrong = config("flux_dev", pipelines)
    wrong.teacher.preset = "sd15"
    with pytest.raises(ValueError, match="'sd15' is not a flow teacher"):
        build_world(wrong)


@pytest.mark.e2e  # test_recipes_flow runs the sft preset on SD3 with resume and export (also e2e)
@pytest.mark.parametrize("preset", ["flux_dev", "sd35_medium"])
def test_sft_trains_a_transformer_copy_on_the_flow_world_under_fsdp(preset, pipelines, images, tmp_path):
    """The first recipe on flow teachers: fine-tuning a copy of the transformer on captioned images, the
    parameters split over fsdp=2 of the 8 fake devices; losses and samples finite, the copy moved."""
    from helpers import flow_teacher, load

    from jdistill import train

    overrides = [
        *flow_teacher(preset, pipelines[preset], pipelines["prompts"], images),
        ("num_steps", "2"),
        ("method.sampler.steps", "2"),
        ("mesh.num_devices", "2"),
        ("mesh.data", "1"),
        ("mesh.fsdp", "2"),
    ]
    config = load("configs/sft.py:digits", overrides)
    results = train.train(config, str(tmp_path / preset))
    assert results["finite"] == 1.0
    lines = logged_metrics(tmp_path / preset)
    losses = [m["model/loss"] for m in lines if "model/loss" in m]
    assert losses and all(np.isfinite(losses))
    s, state, _ = train.restore_latest(config, str(tmp_path / preset))
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)))),
        state["params"]["model"],
        s.world.frozen["teacher"],
    )
    assert max(jax.tree.leaves(moved)) > 0
