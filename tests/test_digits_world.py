"""The shipped digits world: classifier, metrics, and the teacher in diffusers and in jdistill."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jdistill.digits import data
from jdistill.teachers.presets import DIGITS_CLASSIFIER, DIGITS_ROOT, DIGITS_TEACHER

# The shipped world is package data: a missing file fails here (and in test_package_data.py), never skips.


@pytest.fixture(scope="module")
def classifier():
    from jdistill.digits.classifier import load_classifier

    return load_classifier(DIGITS_CLASSIFIER)


def _real(part: str):
    index = data.split(part)
    n = len(data.COLOUR_NAMES)
    index, colours = np.repeat(index, n), np.tile(np.arange(n), len(index))
    return data.render(index, colours), data.digit_labels()[index], colours


def test_frechet_distance_closed_form_for_diagonal_covariances():
    from jdistill.evaluate.frechet import frechet_distance, statistics

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    x = rng.normal(size=(300, 4))
    m, s = statistics(x)
    assert abs(frechet_distance(m, s, m, s)) < 1e-9
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(m, s, m[:3], s[:3, :3])


def test_shipped_classifier_reads_held_out_digits_and_colours(classifier):
    from jdistill.digits.classifier import accuracy

    images, digits, colours = _real("test")
    acc = accuracy(classifier, images, digits, colours)
    assert acc["digit_accuracy"] >= 0.97, acc
    assert acc["colour_accuracy"] >= 0.99, acc


def test_digits_metrics_on_real_images_and_their_degradations(classifier):
    from jdistill.evaluate.digits import digits_metrics

    images, digits, colours = _real("test")
    real = digits_metrics(classifier, images, digits, colours)
    assert real["prompt_accuracy"] >= 0.97
    # Measured 7.1 for the held-out fifth against all real images (the shipped teacher's 50-step samples: 74).
    assert real["frechet_distance"] < 20.0
    assert 0.8 < real["diversity"] < 1.2  # held-out digits vary like the reference set
    rng = np.random.default_rng(0)
    previous = real["frechet_distance"]
    for noise in (0.1, 0.2, 0.4):
        noisy = np.clip(images / 255.0 + rng.normal(0, noise, images.shape), 0, 1)
        fd = digits_metrics(classifier, noisy, digits, colours)["frechet_distance"]
        assert fd > previous
        previous = fd
    # One image per (digit, colour) repeated: no diversity at all.
    firsts = [np.flatnonzero((digits == d) & (colours == c))[0] for d in range(10) for c in range(6)]
    repeated = np.repeat(np.array(firsts), 3)
    collapsed = digits_metrics(classifier, images[repeated], digits[repeated], colours[repeated])
    assert collapsed["diversity"] == pytest.approx(0.0, abs=1e-6)
    # Wrong colours in the prompts: colour accuracy drops to zero, digit accuracy stays.
    wrong = digits_metrics(classifier, images[:600], digits[:600], (colours[:600] + 1) % 6)
    assert wrong["colour_accuracy"] < 0.02 and wrong["digit_accuracy"] > 0.95


def test_shipped_teacher_loads_in_diffusers_and_draws_readable_digits(classifier):
    """The acceptance bar: diffusers' own pipeline, 50 steps with CFG, digit accuracy >= 90%."""
    import torch
    from diffusers import StableDiffusionPipeline

    from jdistill.evaluate.digits import digits_metrics

    pipe = StableDiffusionPipeline.from_pretrained(DIGITS_TEACHER)
    pipe.set_progress_bar_config(disable=True)
    prompts = data.evaluation_prompts(120)
    out = pipe(
        prompts.prompts,
        num_inference_steps=50,
        guidance_scale=_build_record()["guidance_scale"],
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (120, data.SIDE, data.SIDE, 3)
    metrics = digits_metrics(classifier, out, prompts.digits, prompts.colours)
    assert metrics["digit_accuracy"] >= 0.90, metrics
    assert metrics["colour_accuracy"] >= 0.95, metrics


def _build_record() -> dict:
    with open(os.path.join(DIGITS_ROOT, "build.json")) as f:
        return json.load(f)


def test_shipped_teacher_in_jdistill_equals_diffusers():
    """The digits world loads the shipped pipeline through jdistill's converters: the UNet's eps, the text
    encoder's prompt embedding and the VAE's decoding match the PyTorch components."""
    import torch
    from diffusers import StableDiffusionPipeline

    from jdistill.convert.pipeline import load_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(DIGITS_TEACHER)
    ours = load_pipeline(DIGITS_TEACHER, components=("unet", "vae", "text_encoder"), allow_download=False)
    ids = pipe.tokenizer(
        ["a red seven", "the number 3 in cyan"], padding="max_length", max_length=16, return_tensors="np"
    )["input_ids"]
    with torch.no_grad():
        emb_t = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
    te = ours.components["text_encoder"]
    emb = np.asarray(te.net.apply(te.params, ids).last_hidden_state)
    np.testing.assert_allclose(emb, emb_t, rtol=1e-4, atol=1e-4)

    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    t = np.array([999, 400])
    with torch.no_grad():
        eps_t = pipe.unet(torch.from_numpy(z), torch.from_numpy(t), torch.from_numpy(emb_t)).sample.numpy()
        img_t = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    unet, vae = ours.components["unet"], ours.components["vae"]
    eps = np.asarray(
        unet.net.apply(
            unet.params, z.transpose(0, 2, 3, 1), t.astype(np.float32), {"encoder_hidden_states": emb_t}
        )
    )
    np.testing.assert_allclose(eps.transpose(0, 3, 1, 2), eps_t, rtol=1e-4, atol=1e-4)
    img = np.asarray(vae.net.apply(vae.params, z.transpose(0, 2, 3, 1), method="decode"))
    np.testing.assert_allclose(img.transpose(0, 3, 1, 2), img_t, rtol=1e-4, atol=1e-4)


def test_digits_world_saves_a_grid_of_64_and_one_prompt_per_sample(tmp_path):
    """The main job's final samples: the latents (all), a PNG grid of the first 64 decoded, and the prompts of
    all of them in order (what tools/evaluate.py --images ... --prompts ... reads back)."""
    from helpers import load
    from PIL import Image

    from jdistill.sample_files import save_samples
    from jdistill.teachers import build_world

    config = load("configs/swiftbrush.py:digits")
    world = build_world(config)
    n = 70
    samples = np.random.default_rng(0).normal(size=(n, *world.sample_shape)).astype(np.float32)
    labelled = data.evaluation_prompts(n)
    save_samples(
        world,
        str(tmp_path / "final"),
        samples,
        {"digit": labelled.digits, "colour": labelled.colours},
        world.eval_prompts(n),
    )
    assert (tmp_path / "final_prompts.txt").read_text().splitlines() == list(labelled.prompts)
    np.testing.assert_array_equal(np.load(tmp_path / "final.npy"), samples)
    tile = config.teacher.resolution or 32  # the digits preset's images are 32 pixels
    assert Image.open(tmp_path / "final.png").size == (8 * tile, 8 * tile)  # 64 of 70, 8 by 8


def test_an_evaluation_with_image_metrics_decodes_the_samples_once():
    """The digits metrics and FID / CLIP score (train.score) decode the same samples: one decode serves both,
    and other samples are decoded afresh."""
    import dataclasses

    from helpers import load

    from jdistill.digits.classifier import load_classifier
    from jdistill.teachers import build_world
    from jdistill.teachers.digits_world import with_digits
    from jdistill.teachers.presets import DIGITS_CLASSIFIER

    decoded = []

    def decode(samples):
        decoded.append(len(samples))
        return np.zeros((len(samples), 32, 32, 3), np.float32)

    base = dataclasses.replace(
        build_world(load("configs/swiftbrush.py:gmm")), evaluate=lambda s, b: {}, decode=decode
    )
    world = with_digits(base, load_classifier(DIGITS_CLASSIFIER))
    labelled = data.evaluation_prompts(6)
    samples = np.ones((6, 4, 4, 4), np.float32)
    results = world.evaluate(samples, {"digit": labelled.digits, "colour": labelled.colours})
    assert "digit_accuracy" in results
    images = world.decode(samples)  # train.score's decode for the image metrics
    assert decoded == [6] and images.shape == (6, 32, 32, 3)
    world.decode(samples.copy())  # other samples (an equal copy is another array): decoded again
    world.decode(samples[:2])
    assert decoded == [6, 6, 2]
