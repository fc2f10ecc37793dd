"""Every recipe's flow-teacher preset (configs/<recipe>.py:<flow teacher>) on tiny FLUX (guidance-distilled and
schnell-style) and SD3 / SD3.5-style pipelines, on the 8 fake devices with fsdp=2: two steps in one run equal,
bit for bit, one step then a resumed run to step 2; the student exported with ``export_run`` loads in
FluxPipeline / StableDiffusion3Pipeline and draws, from the same noise, what jdistill's own sampler draws
(float32, within 1e-3): sCM's TrigFlow steps as the flow times with the same noise-to-data ratio, MeanFlow's
steps as plain Euler steps with its fixed t - r embedding folded into a bias.

Each case traces its step three times (two runs compile from the persistent cache) and takes 1 to 3 minutes on
2 cores; the default run keeps the cheapest (swiftbrush on SD3: 56 s from a cold compilation cache, against
133 s for the four-step SiD student on SD3.5), the rest are marked ``e2e``:
``python -m pytest -m e2e tests/test_recipes_flow.py``. (test_sid_dit.py's four-step SiD runs on tiny SD3 and
FLUX are ``e2e`` too.)"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tiny_flow_pipeline
from helpers import TINY_RUN, load, logged_metrics
from test_export_flow import PROMPTS, pipeline_latents, to_pipeline_layout

from jdistill import export, train
from jdistill.rng import streams

# case: (config spec, tiny teacher, extra overrides)
CASES = {
    "swiftbrush": ("configs/swiftbrush.py:sd3_medium", "sd3_medium", []),
    "dmd": (
        "configs/dmd.py:flux_schnell",
        "flux_schnell",
        [("method.make_pairs", "8"), ("method.pair_steps", "2")],
    ),
    "dmd2": ("configs/dmd2.py:flux_dev", "flux_dev", [("method.generator_every", "1")]),
    # A LoRA student: exported as the teacher plus pytorch_lora_weights.safetensors (load_lora_weights).
    "dmd2_lora": (
        "configs/dmd2.py:flux_dev",
        "flux_dev",
        [
            ("method.generator_every", "1"),
            ("networks.student.lora.rank", "4"),
            ("networks.student.lora.alpha", "4.0"),
        ],
    ),
    # One-step SiD (SiD-DiT's settings with one student step at flow time 1) on the schnell-style teacher (no
    # guidance input, kappa 1): with sid_4step (SD3.5), sid_lsg (FLUX with guidance embedding) and
    # test_sid_dit.py's four-step runs (SD3, FLUX with guidance), the SiD family meets every tiny flow teacher.
    "sid": ("configs/sid.py:flux_schnell", "flux_schnell", [("method.student_timesteps", "(1.0,)")]),
    "sid_4step": ("configs/sid.py:sd35_medium", "sd35_medium", []),
    "sid_lsg": ("configs/sid_lsg.py:flux_dev", "flux_dev", []),
    "lcm": ("configs/lcm.py:flux_dev", "flux_dev", []),
    "lcm_sd35": ("configs/lcm.py:sd35_medium", "sd35_medium", []),
    "scm": ("configs/scm.py:flux_dev", "flux_dev", []),
    "meanflow": ("configs/meanflow.py:flux_schnell", "flux_schnell", []),
    "sft": ("configs/sft.py:sd3_medium", "sd3_medium", [("method.sampler.steps", "2")]),
}
IN_DEFAULT_RUN = ("swiftbrush",)
NEEDS_IMAGES = ("sft", "scm", "lcm", "meanflow")


@pytest.fixture(scope="module")
def flow_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_recipes")
    (root / "prompts.txt").write_text("\n".join([*PROMPTS, "green of the square", "an 8"]) + "\n")
    return {
        "flux_dev": tiny_flow_pipeline.save_flux_pipeline(root / "flux"),
        "flux_schnell": tiny_flow_pipeline.save_flux_pipeline(root / "schnell", guidance=False),
        "sd3_medium": tiny_flow_pipeline.save_sd3_pipeline(root / "sd3", sd35=False),
        "sd35_medium": tiny_flow_pipeline.save_sd3_pipeline(root / "sd35"),
        "prompts": root / "prompts.txt",
    }


def _overrides(case, flow_pipelines, images, num_steps: int):
    _, teacher, extra = CASES[case]
    data = [("teacher.data", str(images))] if case.split("_")[0] in NEEDS_IMAGES else []
    return [
        ("teacher.path", str(flow_pipelines[teacher])),
        ("teacher.prompts", str(flow_pipelines["prompts"])),
        *data,
        *TINY_RUN,
        ("teacher.resolution", "16"),
        ("mesh.fsdp", "2"),
        ("num_steps", str(num_steps)),
        *extra,
    ]


def _leaves_equal(a, b) -> bool:
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(flat_a, flat_b, strict=True)
    )


def _draws(s, config, key, shape):
    """The initial noise and re-noising draws of the recipe's sampler for ``key`` (a few-step student's; the
    prior alone for a teacher-style sampler or MeanFlow's deterministic steps)."""
    timesteps = s.recipe.student_timesteps
    if not timesteps:
        return np.asarray(s.world.teacher.schedule.prior_sample(key, shape)), []
    k = streams(key, "latent", "renoise")
    z = np.asarray(s.world.teacher.schedule.prior_sample(k["latent"], shape))
    if s.recipe.flow_update != "renoise":  # MeanFlow: deterministic after the prior noise
        return z, []
    keys = jax.random.split(k["renoise"], len(timesteps))
    return z, [np.asarray(jax.random.normal(keys[i], shape)) for i in range(len(timesteps))]


@pytest.mark.parametrize(
    "case", [c if c in IN_DEFAULT_RUN else pytest.param(c, marks=pytest.mark.e2e) for c in CASES]
)
def test_flow_recipe_resumes_bit_exactly_and_exports(case, flow_pipelines, images, tmp_path, monkeypatch):
    spec, teacher, _ = CASES[case]
    config = load(spec, _overrides(case, flow_pipelines, images, 2))
    assert config.teacher.kind == "flow" and jax.device_count() == 8 and config.mesh.num_devices == -1
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert train.train(config, straight)["finite"] == 1.0
    train.train(load(spec, _overrides(case, flow_pipelines, images, 1)), resumed)
    assert train.train(config, resumed)["finite"] == 1.0
    logged = logged_metrics(tmp_path / "resumed")
    assert [m["step"] for m in logged if "steps_per_sec" in m] == [1, 2]
    s, state, step = train.restore_latest(config, resumed)
    _, state_straight, _ = train.restore_latest(config, straight)
    assert step == 2 and _leaves_equal(state, state_straight), "the resumed run differs from the straight one"

    dst = export.export_run(config, resumed, str(tmp_path / "export"))
    record = json.loads((tmp_path / "export" / "jdistill_export.json").read_text())
    assert record["step"] == 2 and record["method"] == config.method.name

    params = train.sampling_params(s, state)
    key = jax.random.key(11)
    cond = jax.jit(s.world.prepare)(params, s.world.conditions.tokenize(PROMPTS))["cond"]
    ours = np.asarray(jax.jit(s.recipe.sample)(params, cond, key))
    z, noises = _draws(s, config, key, ours.shape)
    z = z * record["latents_scale"]
    lora = dst if "load_lora_weights" in record else None
    assert (lora is not None) == case.endswith("_lora")
    kind, theirs = pipeline_latents(dst, teacher, z, record["call"], noises, lora, monkeypatch)
    assert kind == ("FluxPipeline" if teacher.startswith("flux") else "StableDiffusion3Pipeline")
    assert np.isfinite(theirs).all()
    want = to_pipeline_layout(teacher, ours)
    assert np.abs(theirs - want).max() / np.abs(want).max() < 1e-3
