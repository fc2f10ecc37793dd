"""LCM on a UNet teacher: the full student (the teacher's UNet plus LCM's guidance embedding) and LCM-LoRA, each
trained one step on the tiny random SD pipeline with real images on 8 fake devices, exported and run by
diffusers from the same latents as jdistill's sampler; the exported scheduler against LCM's boundary condition;
and the clear errors around the guidance embedding."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import TINY_RUN, flat, load
from test_export import TEACHER_SCHEDULER, _pipeline_latents, _x0_and_output
from test_unet import VARIANTS

from jdistill import rng, train
from jdistill.convert.export import LORA_FILE, scheduler_plan
from jdistill.export import export_run
from jdistill.methods.common import build_network, network_config
from jdistill.methods.trajectory import consistency_scalings
from jdistill.models import build_model, teacher_model_config
from jdistill.models.lora import target_kernels
from jdistill.models.mlp import TimeMLP
from jdistill.models.net import Net
from jdistill.models.unet import UNetConfig, unet_net

COND_PROJ = "['time_embedding']['cond_proj']['kernel']"
PROMPTS = ["a red circle", "a blue square on a green field"]


def lcm_config(preset, tiny_pipelines, images, *overrides):
    """An SD preset of configs/lcm.py on the tiny pipeline: one training step, a one-step sampler."""
    return load(
        f"configs/lcm.py:{preset}",
        [
            ("teacher.path", str(tiny_pipelines["sd"])),
            ("teacher.prompts", str(tiny_pipelines["prompts"])),
            ("teacher.data", str(images)),
            *TINY_RUN,
            ("method.student_timesteps", "(999.,)"),
            *overrides,
        ],
    )


def sample_like_diffusers(s, params, config, dst, record, lora_dir=None):
    """(jdistill's samples, diffusers' from the exported pipeline) from the same initial latents."""
    key = jax.random.key(7)
    cond = jax.jit(s.world.prepare)(params, s.world.conditions.tokenize(PROMPTS))["cond"]
    ours = np.asarray(jax.jit(s.recipe.sample)(params, cond, key))
    z = s.world.teacher.schedule.prior_sample(rng.streams(key, "latent", "renoise")["latent"], ours.shape)
    kind, theirs = _pipeline_latents(dst, PROMPTS, z, record["call"], config.teacher.resolution, lora_dir)
    assert kind == "StableDiffusionPipeline"
    return ours, theirs


def test_lcm_student_from_the_teacher_trains_its_guidance_embedding_and_exports(
    tiny_pipelines, images, tmp_path
):
    config = lcm_config("sd15", tiny_pipelines, images)
    assert config.mesh.num_devices == -1 and jax.device_count() == 8  # all 8 fake devices
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    s, state, step = train.restore_latest(config, workdir)
    assert step == 1

    teacher = flat(s.frozen["teacher"])
    initial = train.init_train_state(s, rng.stream(jax.random.key(config.seed), "init"))  # as train() made it
    start, trained = flat(initial["params"]["student"]), flat(state["params"]["student"])
    assert set(start) == set(teacher) | {COND_PROJ}  # the guidance projection is the only new parameter
    assert all(np.array_equal(start[k], teacher[k]) for k in teacher)  # every other weight is the teacher's
    proj = start[COND_PROJ]
    assert proj.shape == (256, 32)  # (time_cond_proj_dim, the first block's channels)
    bound = 1 / np.sqrt(256)  # torch nn.Linear's default init, as the scripts' new layer
    assert np.abs(proj).max() <= bound and np.abs(proj).mean() > 0.4 * bound
    moved = np.abs(trained[COND_PROJ] - proj)  # Adam's first step: about lr per entry with a gradient
    assert np.median(moved) > 0.5 * config.networks.student.optimizer.lr, "the guidance projection trains"

    dst = tmp_path / "export"
    export_run(config, workdir, str(dst))
    record = json.loads((dst / "jdistill_export.json").read_text())
    assert record["scheduler"] == "LCMScheduler"
    assert record["call"] == {"num_inference_steps": 1, "guidance_scale": 8.5}  # w 7.5 + 1
    assert json.loads((dst / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 256
    assert json.loads((dst / "scheduler" / "scheduler_config.json").read_text())["timestep_scaling"] == 10.0

    # diffusers embeds guidance_scale - 1 = 7.5 (float32 sinusoids of 7500, computed in another order: about
    # 5e-6 apart here, hence twice the tolerance of the LoRA's comparison).
    ours, theirs = sample_like_diffusers(s, train.sampling_params(s, state), config, dst, record)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 2e-5


def test_lcm_lora_trains_one_step_and_its_lora_loads_in_diffusers(tiny_pipelines, images, tmp_path):
    config = lcm_config("sd15_lora", tiny_pipelines, images)
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    s, state, _ = train.restore_latest(config, workdir)
    lora = state["params"]["student"]
    assert set(lora) == set(target_kernels(s.frozen["teacher"], tuple(config.networks.student.lora.targets)))
    assert {m.rsplit(".", 1)[-1] for m in lora} >= {
        "to_q",
        "proj",
        "2",
        "time_emb_proj",
    }  # ff.net.0.proj, ff.net.2
    assert all(float(np.abs(ab["B"]).sum()) > 0 for ab in lora.values()), "every adapter's B left zero"

    dst = tmp_path / "export"
    export_run(config, workdir, str(dst))
    record = json.loads((dst / "jdistill_export.json").read_text())
    assert (dst / LORA_FILE).exists() and record["load_lora_weights"] == str(dst)
    assert record["scheduler"] == "LCMScheduler"
    assert record["call"] == {"num_inference_steps": 1, "guidance_scale": 1.0}  # no CFG: distilled into it

    ours, theirs = sample_like_diffusers(
        s, train.sampling_params(s, state), config, dst, record, lora_dir=dst
    )
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-5


@pytest.mark.parametrize("timesteps", [(999,), (999, 759, 499, 259)])
def test_exported_scheduler_applies_lcm_boundary_condition(timesteps):
    from diffusers import LCMScheduler

    config, call, _ = scheduler_plan(TEACHER_SCHEDULER, "eps", tuple(map(float, timesteps)), (0.5, 10.0))
    assert config["_class_name"] == "LCMScheduler" and config["timestep_scaling"] == 10.0
    scheduler = LCMScheduler.from_config(config)
    scheduler.set_timesteps(**call)
    assert scheduler.timesteps.tolist() == list(timesteps)
    for i, t in enumerate(timesteps):
        x_t, x0, out = _x0_and_output("eps", t, seed=i)
        step = scheduler.step(
            torch.from_numpy(out), t, torch.from_numpy(x_t), generator=torch.Generator().manual_seed(0)
        )
        c_skip, c_out = (float(c[0]) for c in consistency_scalings(jnp.asarray([t])))
        np.testing.assert_allclose(step.denoised.numpy(), c_skip * x_t + c_out * x0, atol=2e-5)
    with pytest.raises(ValueError, match=r"fixes sigma_data = 0\.5"):
        scheduler_plan(TEACHER_SCHEDULER, "eps", (999.0,), (1.0, 10.0))


def test_guidance_embedding_needs_a_unet_teacher_and_a_full_student():
    unet = unet_net(UNetConfig.from_dict(VARIANTS["lcm"]))  # a teacher that already has time_cond_proj_dim 16
    same = build_model(
        teacher_model_config(time_cond_proj_dim=16), types.SimpleNamespace(nets={"teacher": unet})
    )
    assert Net("student", same).abstract.keys() == unet.abstract.keys()
    with pytest.raises(ValueError, match="already has time_cond_proj_dim=16"):
        build_model(teacher_model_config(time_cond_proj_dim=8), types.SimpleNamespace(nets={"teacher": unet}))

    mlp = Net("teacher", lambda rngs: TimeMLP(2, 2, width=8, hidden=8, depth=1, rngs=rngs))
    world = types.SimpleNamespace(nets={"teacher": mlp})
    with pytest.raises(ValueError, match="needs a UNet teacher; this teacher's network is a network without"):
        build_model(teacher_model_config(time_cond_proj_dim=8), world)
    cfg = network_config()
    cfg.model = teacher_model_config(time_cond_proj_dim=8)
    cfg.lora.rank = 4
    with pytest.raises(ValueError, match="cannot add a guidance embedding"):
        build_network("student", cfg, world, 10)
