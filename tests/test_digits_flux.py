"""The miniature flow world. Default run: the shipped world exists (missing package data fails), loads in
FluxPipeline, jdistill's teacher sampler draws what FluxPipeline draws from the same noise, its VAE's shift and
scale normalise the latents, and it scores as its build record says. Marked e2e (minutes on a busy 2-core
machine: every stage compiles): tools/build_flux_digits_world.py's stages shrunk to a few steps give a
FluxPipeline with the trained transformer, and rebuild bit for bit."""

from __future__ import annotations

import filecmp
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from helpers import tool

from jdistill.digits import data
from jdistill.evaluate.images import to_unit
from jdistill.teachers import build_world as build_teacher_world
from jdistill.teachers.digits_world import digits_flux_teacher_config
from jdistill.teachers.presets import DIGITS_FLUX_ROOT, DIGITS_FLUX_TEACHER

TINY = {"text_encoder_2": 2, "vae": 2}
SFT = (
    ("batch_size", "8"),
    ("log_every", "1"),
    ("checkpoint.every", "2"),
    ("sample.every", "0"),
    ("sample.final_count", "8"),
    ("sample.batch", "8"),
    ("method.sampler.steps", "2"),
)
PROMPTS = ["a red seven", "the number 3 in blue", "an image of a cyan 0"]


def shrunk_build(out: str) -> dict:
    return tool("build_flux_digits_world").build_world(  # the build lives with the tools
        out, steps=2, component_steps=TINY, sft_overrides=SFT, vae_stats_images=64, log=lambda m: None
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):  # only e2e tests use it
    out = str(tmp_path_factory.mktemp("flux_digits") / "build")
    return out, shrunk_build(out)


def teacher_world(path: str, **teacher):
    t = digits_flux_teacher_config()
    t.update(path=path, **teacher)
    return build_teacher_world(ml_collections.ConfigDict({"seed": 0, "teacher": t}))


@pytest.mark.e2e  # the shrunk build: 3-6 minutes on a busy 2-core machine
def test_shrunk_build_is_a_flux_pipeline_with_the_trained_transformer(built):
    from diffusers import FluxPipeline

    out, record = built
    for stage in ("text_encoder_2", "vae", "transformer", "one_step"):
        assert stage in record, stage
    assert record["transformer"]["steps"] == 2 and record["sampler"]["steps"] == 2
    assert {"digit_accuracy", "colour_accuracy", "frechet_distance"} <= set(record["one_step"]["final"])
    with open(os.path.join(out, "build.json")) as f:
        assert json.dumps(json.load(f), sort_keys=True) == json.dumps(record, sort_keys=True)  # NaN == NaN

    pipe = FluxPipeline.from_pretrained(os.path.join(out, "teacher"))
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 64
    assert not pipe.transformer.config.guidance_embeds
    assert pipe.vae.config.shift_factor == record["vae"]["shift_factor"]
    assert pipe.vae.config.scaling_factor == record["vae"]["scaling_factor"]
    # T5 reads whole caption words (one id each, then </s>); CLIP is the digits world's tokenizer.
    ids = pipe.tokenizer_2("a red seven")["input_ids"]
    assert pipe.tokenizer_2.convert_ids_to_tokens(ids) == ["\u2581a", "\u2581red", "\u2581seven", "</s>"]
    assert pipe.tokenizer("a red seven")["input_ids"][1:-1] == [
        pipe.tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "red", "seven")
    ]
    # The exported transformer is the run's EMA, not init/'s placeholder.
    init = FluxPipeline.from_pretrained(os.path.join(out, "init"))
    w_init = init.transformer.x_embedder.weight.detach().numpy()
    assert not np.allclose(w_init, pipe.transformer.x_embedder.weight.detach().numpy())


def test_vae_shift_and_scale_normalise_the_latents():
    """diffusers' AutoencoderKL of the shipped world, on 300 of the images its statistics were measured on
    (every image in every colour): (z - shift) * scale has mean about 0 and std about 1 (posterior means, as
    the build measures them)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(DIGITS_FLUX_TEACHER, "vae"))
    n_colours = len(data.COLOUR_NAMES)
    pool = data.split("all")[::36]  # 50 digits in 6 colours
    images = data.render(np.repeat(pool, n_colours), np.tile(np.arange(n_colours), len(pool)))
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode().numpy()
    scaled = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert z.shape == (len(images), 16, 8, 8)
    assert abs(scaled.mean()) < 0.05 and abs(scaled.std() - 1.0) < 0.05


def test_teacher_sampler_equals_flux_pipeline():
    """jdistill's flow world on the shipped teacher and FluxPipeline, from the same noise: three Euler steps
    with true CFG 4 against the empty prompt give the same latents, and the same decoded images."""
    from diffusers import FluxPipeline

    from jdistill.convert.export_flow import teacher_call
    from jdistill.diffusion.denoiser import predict_cfg
    from jdistill.diffusion.samplers import ode_plan, run_sampler
    from jdistill.models.flux import pack_latents

    teacher = DIGITS_FLUX_TEACHER
    world = teacher_world(teacher)
    steps, scale = 3, 4.0
    cond = jax.jit(world.prepare)(world.frozen, world.conditions.tokenize(PROMPTS))["cond"]
    z = np.asarray(jax.random.normal(jax.random.key(3), (len(PROMPTS), *world.sample_shape)))
    plan = ode_plan(world.teacher.schedule, steps)

    def denoise(x, t):
        return predict_cfg(world.teacher, world.frozen["teacher"], x, t, cond, world.uncond, scale)

    ours = np.asarray(jax.jit(lambda x: run_sampler(denoise, x, plan))(jnp.asarray(z)))
    ours_images = to_unit(world.decode(ours))

    pipe = FluxPipeline.from_pretrained(teacher)
    call = {**teacher_call("FluxPipeline", False, steps, scale), "height": 32, "width": 32}
    latents = torch.from_numpy(np.asarray(pack_latents(jnp.asarray(z))).copy())
    with torch.no_grad():
        theirs = pipe(PROMPTS, latents=latents, output_type="latent", max_sequence_length=16, **call).images
        images = pipe(PROMPTS, latents=latents, output_type="np", max_sequence_length=16, **call).images
    packed = np.asarray(pack_latents(jnp.asarray(ours)))
    assert np.abs(packed - theirs.numpy()).max() < 1e-4 * np.abs(packed).max()
    assert np.abs(ours_images - images).max() < 1e-3


def test_the_flow_world_has_the_digits_sources_and_refuses_the_unet_kind(tmp_path):
    world = teacher_world(DIGITS_FLUX_TEACHER)
    batch = world.eval_batch(6)
    labels = data.evaluation_prompts(6)
    assert (batch["digit"] == labels.digits).all() and (batch["colour"] == labels.colours).all()
    assert world.data.local_batch(0, 4)["images"].shape == (4, 32, 32, 3)
    assert world.sample_shape == (8, 8, 16)

    t = digits_flux_teacher_config()
    t.kind = "digits"
    with pytest.raises(ValueError, match=r"teacher\.kind 'flow'"):
        build_teacher_world(ml_collections.ConfigDict({"seed": 0, "teacher": t}))
    with pytest.raises(FileNotFoundError, match="classifier"):
        teacher_world(DIGITS_FLUX_TEACHER, classifier=str(tmp_path / "nowhere"))


def _same_tree(a: str, b: str) -> list[str]:
    """Files that differ (or exist on one side only) between two directory trees."""
    cmp = filecmp.dircmp(a, b)
    out = [os.path.join(a, n) for n in cmp.left_only + cmp.right_only + cmp.funny_files]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    out += [os.path.join(a, n) for n in mismatch + errors]
    for sub in cmp.common_dirs:
        out += _same_tree(os.path.join(a, sub), os.path.join(b, sub))
    return out


def _without_seconds(record):
    if isinstance(record, dict):
        return {k: _without_seconds(v) for k, v in record.items() if not k.startswith("seconds")}
    return record


@pytest.mark.e2e  # a second shrunk build
def test_rebuild_is_bit_identical(built, tmp_path):
    out, record = built
    again = shrunk_build(str(tmp_path / "again"))
    assert _same_tree(os.path.join(out, "teacher"), str(tmp_path / "again" / "teacher")) == []
    assert _same_tree(os.path.join(out, "init"), str(tmp_path / "again" / "init")) == []
    same = json.dumps(_without_seconds(again), sort_keys=True) == json.dumps(
        _without_seconds(record), sort_keys=True
    )
    assert same, (again, record)  # compared as JSON: a NaN metric (diversity of 8 samples) equals itself


# ------------------------------------------------------------------------------------------- the shipped world


def test_shipped_world_exists_and_scores_as_recorded():
    """The package's flow digits teacher (missing package data fails here): it loads in FluxPipeline, and
    re-drawn at its recorded sampler on 60 fresh prompts (noise other than the build's), the classifier reads
    the digits and colours about as often as build.json says."""
    from diffusers import FluxPipeline

    from jdistill.diffusion.denoiser import predict_cfg
    from jdistill.diffusion.samplers import ode_plan, run_sampler

    record_path = os.path.join(DIGITS_FLUX_ROOT, "build.json")
    assert os.path.exists(os.path.join(DIGITS_FLUX_TEACHER, "model_index.json")), "shipped teacher missing"
    assert os.path.exists(record_path), "shipped build record missing"
    with open(record_path) as f:
        record = json.load(f)
    size = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(DIGITS_FLUX_TEACHER) for f in files
    )
    assert size < 10e6, f"the shipped teacher is {size / 1e6:.1f} MB"
    FluxPipeline.from_pretrained(DIGITS_FLUX_TEACHER)

    world = teacher_world("")  # the preset's default path: the shipped teacher
    sampler = record["sampler"]
    n = 60
    batch = world.eval_batch(n)
    cond = jax.jit(world.prepare)(world.frozen, batch)["cond"]
    z = jax.random.normal(jax.random.key(11), (n, *world.sample_shape))
    for steps, recorded in (
        (sampler["steps"], record["transformer"]["final"]),
        (1, record["one_step"]["final"]),
    ):
        plan = ode_plan(world.teacher.schedule, steps)

        def denoise(x, t, plan=plan):
            return predict_cfg(
                world.teacher, world.frozen["teacher"], x, t, cond, world.uncond, sampler["guidance_scale"]
            )

        samples = np.asarray(jax.jit(lambda x, plan=plan, denoise=denoise: run_sampler(denoise, x, plan))(z))
        got = world.evaluate(samples, batch)
        for key in ("digit_accuracy", "colour_accuracy"):
            # 60 samples: a binomial spread of at most 0.065; 0.2 leaves room for the prompts' phrasing.
            assert abs(got[key] - recorded[key]) < 0.2, (steps, key, got[key], recorded[key])
