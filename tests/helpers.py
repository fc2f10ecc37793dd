"""Shared helpers for tests: small configs, subprocess runs of the entry point, checkpoint reading."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import configuration
from jdistill.methods.recipe import Carry

REPO = pathlib.Path(__file__).resolve().parent.parent

# Tiny networks and short runs: tests check plumbing and exactness, not quality.
SMALL = [
    ("num_steps", "6"),
    ("batch_size", "32"),
    ("log_every", "2"),
    ("progress_bar", "false"),
    ("checkpoint.every", "3"),
    ("sample.final_count", "64"),
    ("sample.batch", "64"),
    ("sample.count", "64"),
    ("mesh.num_devices", "1"),  # the test process has 8 fake devices; only sharding tests use them
]
# A UNet recipe on a tiny diffusers pipeline (conftest's tiny_pipelines): 32 px, one step, 8 samples.
TINY_RUN = [
    ("teacher.resolution", "32"),
    # The real-size presets compute in bfloat16 and split their steps per update; the tiny runs check
    # float32 results of one-program steps (tests/test_split_updates.py covers the split).
    ("teacher.dtype", "float32"),
    ("teacher.param_dtype", "float32"),
    ("split_updates", "false"),
    ("batch_size", "8"),
    ("num_steps", "1"),
    ("log_every", "1"),
    ("checkpoint.every", "1"),
    ("progress_bar", "false"),
    ("sample.count", "8"),
    ("sample.final_count", "8"),
    ("sample.batch", "8"),
]
SMALL_SWIFTBRUSH_NETS = [
    (f"networks.{n}.model.{k}", v)
    for n in ("student", "fake_score")
    for k, v in (("width", "32"), ("hidden", "64"), ("depth", "1"))
]


def flow_teacher(preset: str, path, prompts, data=None) -> list[tuple[str, str]]:
    """Overrides that point a flow recipe's preset at a tiny FLUX / SD3 pipeline on disk, its prompts and
    (for the recipes that train on images) its data, then TINY_RUN's short run."""
    return [
        ("teacher.kind", "flow"),
        ("teacher.preset", preset),
        ("teacher.path", str(path)),
        ("teacher.prompts", str(prompts)),
        *([] if data is None else [("teacher.data", str(data))]),
        *TINY_RUN,
    ]


def tool(name: str) -> types.ModuleType:
    """``tools/<name>.py`` as a module (its ``main(argv)`` is what the command line runs)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec: str, overrides=()) -> configuration.ml_collections.ConfigDict:
    return configuration.load(str(REPO / spec.split(":")[0]) + ":" + spec.split(":")[1], list(overrides))


def small_swiftbrush(*overrides: tuple[str, str]):
    return load("configs/swiftbrush.py:gmm", [*SMALL, *SMALL_SWIFTBRUSH_NETS, *overrides])


# XLA:CPU without LLVM's optimisations (as conftest sets for the test process): a one-step run of a flow-world preset compiles in about two thirds of the
# time (dmd2's step 19 s instead of 34 s on a busy 2-core machine) and runs a little slower, which a run of one or
# two steps never notices. For plumbing runs only: a quality run would pay for it in every step.
QUICK_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def subprocess_env(num_devices: int = 1, quick_compile: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    if quick_compile:
        env["XLA_FLAGS"] += " " + QUICK_COMPILE_FLAGS
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def main_command(workdir, spec="configs/swiftbrush.py:gmm", overrides=()) -> list[str]:
    cmd = [sys.executable, "-m", "jdistill.main", f"--config={spec}", f"--workdir={workdir}"]
    return cmd + [f"--config.{k}={v}" for k, v in overrides]


def run_main(
    workdir,
    spec="configs/swiftbrush.py:gmm",
    overrides=(),
    timeout=300,
    num_devices=1,
    quick_compile=False,
    flags=(),
    env=None,
):
    """``python -m jdistill.main`` on ``workdir`` with ``--config.<k>=<v>`` overrides and further ``flags``
    (e.g. ``--mode=sample``), in a CPU process with ``num_devices`` devices and the variables of ``env``."""
    return subprocess.run(
        [*main_command(workdir, spec, overrides), *flags],
        cwd=REPO,
        env={**subprocess_env(num_devices, quick_compile), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def logged_metrics(workdir) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def flat(tree) -> dict[str, np.ndarray]:
    """A pytree as {path: numpy array} (global values)."""
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def max_abs_diff(a, b) -> float:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    return max(float(np.max(np.abs(fa[k].astype(np.float64) - fb[k].astype(np.float64)))) for k in fa)


def gmm_quality(samples: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, float]:
    """Independent of jdistill.evaluate: fraction within 0.5 of a mode, per-mode shares, class consistency."""
    angles = 2 * np.pi * np.arange(8) / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    dist = np.sqrt(((samples[:, None, :] - means[None]) ** 2).sum(-1))
    nearest = dist.argmin(1)
    return (
        (dist.min(1) < 0.5).mean(),
        np.bincount(nearest, minlength=8) / len(samples),
        (nearest % 2 == labels).mean(),
    )


def grads_wrt_trained(loss, params, batch, key, carry=None):
    """Gradients of a recipe loss with respect to every trained network (everything but the teacher)."""

    def f(p):
        return loss({**params, **p}, batch, key, carry or Carry(step=0))[0]

    return jax.grad(f)({k: v for k, v in params.items() if k != "teacher"})


def assert_same_state_dict(back: dict[str, np.ndarray], state: dict[str, np.ndarray], what: str = "") -> None:
    """The same keys, and under each an array of the same dtype and bits (``what`` labels a failure)."""
    assert back.keys() == state.keys(), what
    for key in state:
        assert back[key].dtype == state[key].dtype and np.array_equal(back[key], state[key]), (what, key)


def abs_sum(tree) -> float:
    return float(sum(np.sum(np.abs(np.asarray(x))) for x in jax.tree.leaves(tree)))


# A flow pipeline's text encoders: its CLIP encoders and its T5 encoder, by pipeline kind.
FLOW_TEXT_ENCODERS = {
    "flux": (("text_encoder",), "text_encoder_2"),
    "sd3": (("text_encoder", "text_encoder_2"), "text_encoder_3"),
}


def encode_flow_prompts(kind: str, path: str, prompts: list[str], t5_length: int, **load_options) -> dict:
    """jdistill's prompt encoding of a FLUX / SD3 pipeline directory: FlowPromptEncoder over the text encoders
    load_pipeline reads from ``path`` (``load_options`` go to it); the condition dict of ``prompts``."""
    import jax.numpy as jnp

    from jdistill.convert.pipeline import load_pipeline
    from jdistill.teachers.prompts import FlowPromptEncoder

    clips, t5 = FLOW_TEXT_ENCODERS[kind]
    ours = load_pipeline(path, components=(*clips, t5), **load_options)
    encoder = FlowPromptEncoder(
        kind,
        tuple((n, ours.components[n].net) for n in clips),
        (t5, ours.components[t5].net),
        ours.tokenizers,
        t5_length=t5_length,
    )
    batch = {k: jnp.asarray(v) for k, v in encoder.tokenize(prompts).items()}
    return encoder.encode({n: c.params for n, c in ours.components.items()}, batch)


def pipeline_prompt_embeds(kind: str, path: str, prompts: list[str], t5_length: int):
    """The same pipeline's own ``encode_prompt`` (diffusers, no CFG): the prompt embeddings and the pooled ones,
    as torch tensors."""
    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    with torch.no_grad():
        if kind == "flux":
            embeds, pooled, _ = FluxPipeline.from_pretrained(path).encode_prompt(
                prompts, prompt_2=None, max_sequence_length=t5_length
            )
        else:
            embeds, _, pooled, _ = StableDiffusion3Pipeline.from_pretrained(path).encode_prompt(
                prompts,
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=False,
                max_sequence_length=t5_length,
            )
    return embeds, pooled


@dataclasses.dataclass
class GMMGeneratorDraws:
    """What a distribution-matching generator update on the Gaussian mixture draws from its key, by hand: the
    one-step student's prior noise ``z`` (stream "latent" under "generate"), t ~ U{t_range} ("timestep"),
    the noise ``eps`` ("noise"), and the VP coefficients ``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)`` as
    (n, 1) columns."""

    z: jax.Array
    t: jax.Array
    eps: jax.Array
    a: jax.Array
    s: jax.Array

    def student_x(self, student, params, cond) -> jax.Array:
        """The one-step student's sample: its x0 output at model time 999."""
        return student.apply(params, self.z, jnp.full((self.z.shape[0],), 999.0), cond)

    def noised(self, x: jax.Array) -> jax.Array:
        return self.a * x + self.s * self.eps


def gmm_generator_draws(schedule, key: jax.Array, n: int, t_range) -> GMMGeneratorDraws:
    from jdistill import rng
    from jdistill.diffusion.schedules import sample_timesteps

    k = rng.streams(key, "generate", "timestep", "noise")
    z = jax.random.normal(rng.stream(k["generate"], "latent"), (n, 2))
    t = sample_timesteps(schedule, k["timestep"], (n,), *t_range)
    eps = jax.random.normal(k["noise"], (n, 2))
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t][:, None]
    return GMMGeneratorDraws(z, t, eps, jnp.sqrt(abar), jnp.sqrt(1 - abar))


def poison_label(tree, label: int):
    """Parameters of a class-conditioned toy network whose class embedding of ``label`` is NaN: that class's
    predictions are not finite."""

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        return leaf.at[label].set(jnp.nan) if "label_embed" in name and "embedding" in name else leaf

    return jax.tree_util.tree_map_with_path(one, tree)
