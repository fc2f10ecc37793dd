"""Every distribution-matching recipe's SD preset (and the SD fine-tune preset), run end to end on a tiny
random diffusers pipeline (text-conditioned UNet, CLIP, VAE) on 8 fake devices: a step, a checkpoint, a
resumed run to step 2, finite samples. The presets' own networks are kept (full UNet copies, LoRA fake score or student, GAN head on
the fake UNet's mid block with real images), only sizes and step counts shrink.

About 1 to 2.5 minutes per recipe on 2 busy cores (tracing the UNet steps twice, compilation and Orbax saves
dominate), so all are marked ``e2e``: ``python -m pytest -m e2e tests/test_recipes_unet.py``. The default run
keeps the UNet family's end-to-end runs elsewhere: swiftbrush trains on the tiny SD teacher and exports in
test_export.py, a LoRA fake score trains in test_lora.py, the digits presets run briefly in test_main_digits.py.
The broadest case here is dmd2_sdxl_lora (SDXL, four steps with backward simulation, a LoRA student, a full
fake score with the GAN on real images, resume): 132 s from a cold compilation cache."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from helpers import TINY_RUN, load, logged_metrics

from jdistill import train
from jdistill.models.lora import target_kernels

CASES = {
    "swiftbrush": ("configs/swiftbrush.py:sd15", "sd", []),
    "dmd": ("configs/dmd.py:sd15", "sd", [("method.make_pairs", "8"), ("method.pair_steps", "2")]),
    "dmd2_gan": ("configs/dmd2.py:sd15_gan", "sd", [("method.generator_every", "2")]),
    # Both steps run the full update (generator, fake score, GAN head), so the resumed run's step is the same
    # compiled program (the persistent cache serves it); the fake-only step is covered on the gmm presets.
    # The preset's split step (one program per update: the prepared embeddings and the GAN's carried x handed
    # from the generator's program to the fake score's) runs here; TINY_RUN turns it off elsewhere.
    "dmd2_sdxl_lora": (
        "configs/dmd2.py:sdxl_lora",
        "sdxl",
        [("method.generator_every", "1"), ("split_updates", "true")],
    ),
    "sid_4step_gan": (
        "configs/sid.py:sd15_4step",
        "sd",
        [("method.gan.generator_weight", "0.5"), ("method.gan.discriminator_weight", "1.0")],
    ),
    "sid_lsg": ("configs/sid_lsg.py:sd15", "sd", []),
    # Not a distillation: the fine-tune preset, one network on the real images.
    "sft": ("configs/sft.py:sd15", "sd", [("method.sampler.steps", "2")]),
}


IN_DEFAULT_RUN = ()  # see the module docstring


@pytest.mark.parametrize(
    "case", [c if c in IN_DEFAULT_RUN else pytest.param(c, marks=pytest.mark.e2e) for c in CASES]
)
def test_recipe_runs_on_a_tiny_unet_teacher_and_resumes(case, tiny_pipelines, images, tmp_path, caplog):
    spec, pipe, overrides = CASES[case]
    base = [
        ("teacher.path", str(tiny_pipelines[pipe])),
        ("teacher.prompts", str(tiny_pipelines["prompts"])),
        ("teacher.data", str(images)),
        *TINY_RUN,
        *overrides,
    ]
    workdir = str(tmp_path / "run")
    config = load(spec, base)
    assert config.mesh.num_devices == -1 and jax.device_count() == 8  # all 8 fake devices
    train.train(config, workdir)
    with caplog.at_level(logging.INFO, logger="jdistill"):
        final = train.train(load(spec, [*base, ("num_steps", "2")]), workdir)
    assert "resumed from checkpoint at step 1" in caplog.text
    logged = logged_metrics(workdir)
    assert [m["step"] for m in logged if "steps_per_sec" in m] == [1, 2]  # no step lost or redone
    samples = np.load(f"{workdir}/samples/final.npy")
    assert samples.shape == (8, 16, 16, 4) and np.isfinite(samples).all()
    assert final["finite"] == 1.0

    s, state, _ = train.restore_latest(load(spec, [*base, ("num_steps", "2")]), workdir)
    names = {n.name for n in s.recipe.networks}
    if config.method.get("gan") and config.method.gan.generator_weight > 0:
        assert "discriminator" in names  # the GAN head trains and is checkpointed with the rest
    if case == "dmd2_sdxl_lora":  # a LoRA student: only the adapters are trained and stored
        student = state["params"]["student"]
        kernels = target_kernels(s.frozen["teacher"], ("to_q", "to_k", "to_v", "to_out.0"))
        assert set(student) == set(kernels)
        assert all(
            student[m]["A"].shape == (i, 64) and student[m]["B"].shape == (64, o)
            for m, (i, o) in kernels.items()
        )
    if case == "swiftbrush":  # a LoRA fake score on to_q / to_v, rank 64
        fake = state["params"]["fake_score"]
        assert {k.rsplit(".", 1)[-1] for k in fake} == {"to_q", "to_v"}
        assert all(v["A"].shape[1] == 64 for v in fake.values())
