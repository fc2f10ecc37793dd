"""tools/build_digits_world.py's stages, shrunk to a few steps each: every stage writes what the next one
reads, the result loads in diffusers, and an interrupted build resumes without redoing finished stages."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import tool

pytestmark = pytest.mark.e2e  # compiles the VAE, the UNet's training step and its sampler: about 2 minutes

TINY = {"classifier": 3, "text_encoder": 3, "vae": 3}
SFT = (
    ("batch_size", "8"),
    ("log_every", "1"),
    ("checkpoint.every", "2"),
    ("sample.every", "0"),
    ("sample.final_count", "16"),
    ("sample.batch", "16"),
    ("method.sampler.steps", "2"),
)


def test_build_writes_a_diffusers_teacher_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    build_world = tool("build_digits_world").build_world  # the build lives with the tools

    out = str(tmp_path / "build")
    record = build_world(out, unet_steps=2, component_steps=TINY, sft_overrides=SFT, log=lambda m: None)
    for stage in ("classifier", "text_encoder", "vae", "unet"):
        assert stage in record, stage
    assert record["unet"]["steps"] == 2
    assert {"digit_accuracy", "colour_accuracy", "frechet_distance", "diversity"} <= set(
        record["unet"]["final"]
    )
    with open(os.path.join(out, "build.json")) as f:
        assert json.load(f)["vae"]["scaling_factor"] == record["vae"]["scaling_factor"]

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(out, "teacher"))
    assert (
        pipe.unet.config.sample_size == 8
        and pipe.vae.config.scaling_factor == record["vae"]["scaling_factor"]
    )
    assert pipe.tokenizer("a red seven")["input_ids"][1:-1] == [
        pipe.tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "red", "seven")
    ]

    # The exported UNet is the run's EMA: not the untrained initial UNet of init/.
    init = StableDiffusionPipeline.from_pretrained(os.path.join(out, "init"))
    w_init = init.unet.conv_in.weight.detach().numpy()
    w_out = pipe.unet.conv_in.weight.detach().numpy()
    assert not np.allclose(w_init, w_out)

    # Resume: finished stages are kept, the UNet's run continues from its checkpoint to the new step count.
    stamp = os.path.getmtime(os.path.join(out, "classifier", "classifier.safetensors"))
    again = build_world(out, unet_steps=4, component_steps=TINY, sft_overrides=SFT, log=lambda m: None)
    assert os.path.getmtime(os.path.join(out, "classifier", "classifier.safetensors")) == stamp
    assert again["unet"]["steps"] == 4
    with open(os.path.join(out, "sft", "metrics.jsonl")) as f:
        steps = [json.loads(line).get("step") for line in f]
    assert max(s for s in steps if s is not None) >= 3
