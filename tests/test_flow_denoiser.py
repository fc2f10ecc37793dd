"""The flow-matching transformer teachers as jdistill denoisers, against diffusers' own pipelines: the same
prompt embeddings and starting noise through FluxPipeline (guidance embedding, resolution-dependent shift) and
StableDiffusion3Pipeline (true CFG with negative prompts, static shift 3) land on the same latents as
jdistill's flow Euler sampler driving ``FlowTransformerDenoiser``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_flow_pipeline
import torch
from helpers import encode_flow_prompts, pipeline_prompt_embeds

from jdistill.convert.pipeline import load_pipeline
from jdistill.diffusion.denoiser import predict_cfg, with_guidance_input
from jdistill.diffusion.samplers import flow_euler_plan, flux_sigmas, run_sampler
from jdistill.diffusion.schedules import FlowSchedule, flux_mu
from jdistill.diffusion.transformer_denoiser import FlowTransformerDenoiser
from jdistill.models.flux import pack_latents

STEPS = 3


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return tiny_flow_pipeline.save_flux_pipeline(tmp_path_factory.mktemp("flux") / "p")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return tiny_flow_pipeline.save_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "p")


def test_flux_sampler_equals_flux_pipeline(flux_dir):
    from diffusers import FluxPipeline

    rng = np.random.default_rng(0)
    batch, side = 2, 8  # 16 px images: 8x8x16 latents, 16 packed tokens
    latents = rng.standard_normal((batch, side, side, 16)).astype(np.float32)
    context = rng.standard_normal((batch, 7, 24)).astype(np.float32)
    pooled = rng.standard_normal((batch, 32)).astype(np.float32)
    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    packed = np.asarray(pack_latents(jnp.asarray(latents)))
    with torch.no_grad():
        want = pipe(
            prompt_embeds=torch.from_numpy(context),
            pooled_prompt_embeds=torch.from_numpy(pooled),
            latents=torch.from_numpy(packed),
            height=16,
            width=16,
            num_inference_steps=STEPS,
            guidance_scale=3.5,
            output_type="latent",
        ).images.numpy()

    component = load_pipeline(str(flux_dir), components=("transformer",)).components["transformer"]
    denoiser = FlowTransformerDenoiser(component.net, FlowSchedule(), "flux")
    assert denoiser.embedded_guidance
    sched = pipe.scheduler.config
    mu = flux_mu(16, sched.base_image_seq_len, sched.max_image_seq_len, sched.base_shift, sched.max_shift)
    plan = flow_euler_plan(denoiser.schedule, STEPS, sigmas=flux_sigmas(STEPS, mu=mu))
    np.testing.assert_allclose(plan.timesteps, pipe.scheduler.sigmas[:-1].numpy(), rtol=1e-6)
    cond = {"encoder_hidden_states": jnp.asarray(context), "pooled_projections": jnp.asarray(pooled)}

    @jax.jit
    def sample(params, x):
        return run_sampler(lambda x, t: predict_cfg(denoiser, params, x, t, cond, None, 3.5), x, plan)

    ours = pack_latents(sample(component.params, jnp.asarray(latents)))
    assert rel(ours, want) < 1e-4
    # The scale reaches the guidance input: another scale moves the sample.
    other = run_sampler(
        lambda x, t: predict_cfg(denoiser, component.params, x, t, cond, None, 1.5),
        jnp.asarray(latents),
        plan,
    )
    assert rel(pack_latents(other), want) > 1e-3


def test_sd3_sampler_with_true_cfg_equals_sd3_pipeline(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    rng = np.random.default_rng(1)
    batch, h, w = 2, 8, 12  # 16 x 24 px: a non-square patch grid
    latents = rng.standard_normal((batch, h, w, 16)).astype(np.float32)
    context, negative = (rng.standard_normal((batch, 9, 72)).astype(np.float32) for _ in range(2))
    pooled, negative_pooled = (rng.standard_normal((batch, 64)).astype(np.float32) for _ in range(2))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    with torch.no_grad():
        want = pipe(
            prompt_embeds=torch.from_numpy(context),
            negative_prompt_embeds=torch.from_numpy(negative),
            pooled_prompt_embeds=torch.from_numpy(pooled),
            negative_pooled_prompt_embeds=torch.from_numpy(negative_pooled),
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            height=16,
            width=24,
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            output_type="latent",
        ).images.numpy()

    component = load_pipeline(str(sd3_dir), components=("transformer",)).components["transformer"]
    denoiser = FlowTransformerDenoiser(component.net, FlowSchedule(shift=3.0), "sd3")
    assert not denoiser.embedded_guidance
    plan = flow_euler_plan(denoiser.schedule, STEPS)
    np.testing.assert_allclose(plan.timesteps, pipe.scheduler.sigmas[:-1].numpy(), rtol=1e-6)
    cond = {"encoder_hidden_states": jnp.asarray(context), "pooled_projections": jnp.asarray(pooled)}
    uncond = {
        "encoder_hidden_states": jnp.asarray(negative),
        "pooled_projections": jnp.asarray(negative_pooled),
    }

    @jax.jit
    def sample(params, x):
        return run_sampler(lambda x, t: predict_cfg(denoiser, params, x, t, cond, uncond, 4.0), x, plan)

    ours = sample(component.params, jnp.asarray(latents))
    assert rel(np.asarray(ours).transpose(0, 3, 1, 2), want) < 1e-4


def test_guidance_input_follows_the_cfg_convention():
    cond = {"encoder_hidden_states": jnp.zeros((3, 2, 4))}
    assert np.allclose(with_guidance_input(cond, 3.5, "uncond", 3)["guidance"], 3.5)
    assert np.allclose(with_guidance_input(cond, 3.5, "cond", 3)["guidance"], 4.5)  # y_c + w (y_c - y_u)
    assert np.allclose(with_guidance_input(cond, None, "uncond", 3)["guidance"], 1.0)  # no guidance
    per_sample = with_guidance_input(cond, jnp.array([1.0, 2.0, 3.0]), "uncond", 3)["guidance"]
    assert per_sample.shape == (3,) and np.allclose(per_sample, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="unknown CFG convention"):
        with_guidance_input(cond, 2.0, "negative", 3)
    with pytest.raises(ValueError, match="unknown transformer family"):
        FlowTransformerDenoiser(None, FlowSchedule(), "pixart")


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_prompt_encoding_equals_the_pipelines_encode_prompt(kind, flux_dir, sd3_dir):
    path = str(flux_dir if kind == "flux" else sd3_dir)
    prompts = ["a red circle", "the digit 3 on a blue square of green"]
    cond = encode_flow_prompts(kind, path, prompts, 12)
    embeds, pooled = pipeline_prompt_embeds(kind, path, prompts, 12)
    assert cond["encoder_hidden_states"].shape == tuple(embeds.shape)
    assert rel(cond["encoder_hidden_states"], embeds.numpy()) < 1e-4
    assert rel(cond["pooled_projections"], pooled.numpy()) < 1e-4
