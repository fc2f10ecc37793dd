"""Writing a trained FLUX / SD3 transformer back into a FluxPipeline or StableDiffusion3Pipeline directory.

The transformer goes through the inverse conversion tables; the teacher's other components are copied (or
written from Flax parameters when the source was made by ``tools/convert_teacher.py``). The scheduler is
diffusers' ``FlowMatchEulerDiscreteScheduler`` set up so that the pipeline runs the student's own sampler:

- shift 1 and no dynamic shifting: the pipeline's sigmas are then the student's times exactly (t = sigma on
  the rectified-flow path x_t = (1 - t) x0 + t eps);
- one step from t = 1: the plain Euler step x_0 = z - v is the student's x0 = x_t - t v, so the call is
  ``num_inference_steps=1``; at another first time t_0 the call passes ``sigmas=[t_0]``;
- several steps (predict x0, re-noise to the next time with fresh noise): ``stochastic_sampling``, whose
  step is x0 = x - sigma v, then (1 - sigma') x0 + sigma' noise, and the call passes the student's times as
  ``sigmas``; a MeanFlow student's steps z_r = z_t - (t - r) u are the plain Euler steps at those sigmas;
- no few-step times (an ``sft`` fine-tune): the teacher's scheduler, unchanged, called with the run's sampler
  settings (``teacher_sampler``: steps and CFG).

A FLUX student whose time inputs are scaled by k instead of diffusers' 1000 (``time_scale``: T2I-Distill's x1
students) keeps the plain pipeline and transformer class: FluxPipeline passes ``scheduler.timesteps / 1000``
and the transformer multiplies by 1000, and the scheduler's timesteps are sigmas x num_train_timesteps, so a
scheduler with ``num_train_timesteps`` = k feeds the transformer k t; the guidance is multiplied by 1000 too, so
the recorded call's ``guidance_scale`` is the student's guidance input x k / 1000.

A MeanFlow FLUX student keeps its t - r embedder (``meanflow``): its transformer is written as
``MeanFlowFluxTransformer2DModel`` (``jdistill/convert/meanflow_flux.py``, copied into ``transformer/``, needing only
torch and diffusers), which takes r as the next of its ``meanflow_times`` and embeds t, t - r and the guidance with
its own scale; FluxPipeline's plain Euler steps at ``sigmas`` = those times are then MeanFlow's steps.
``DiffusionPipeline.from_pretrained(dst, trust_remote_code=True)`` loads it (model_index.json names the module).

A student that starts from scaled noise (``input_scale`` s: SiD-LSG's t_0 z) cannot fold s into the
transformer (the Euler step adds the unscaled latents), so the record asks for ``latents`` = s x randn.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from jdistill import paths
from jdistill.convert.core import ConversionError
from jdistill.convert.export import (
    EXPORT_MARKER,
    LORA_FILE,
    save_weights,
    write_json,
    write_scheduler,
    write_teacher_components,
)
from jdistill.convert.io import read_json
from jdistill.models.flux import DIFFUSERS_TIME_SCALE

PyTree = Any
FLOW_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
MEANFLOW_MODULE = "meanflow_flux"  # jdistill/convert/meanflow_flux.py, copied into the export's transformer/
MEANFLOW_CLASS = "MeanFlowFluxTransformer2DModel"
_SIGMA_OPTIONS_OFF = {
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def flow_scheduler_plan(
    teacher_scheduler: Mapping[str, Any],
    timesteps: tuple[float, ...],
    stochastic: bool = True,
    time_scale: float = DIFFUSERS_TIME_SCALE,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scheduler config, call arguments) that run a student with ``timesteps`` (flow times in (0, 1],
    decreasing) in a diffusers flow pipeline, re-noising between steps (``stochastic``) or stepping the ODE
    with the student's velocity (MeanFlow's average velocity); the teacher's scheduler and no arguments
    without timesteps. ``time_scale``: the factor the student's transformer takes its flow time with (FLUX's
    1000, or T2I-Distill's 1: the scheduler's num_train_timesteps)."""
    if not timesteps:
        if time_scale != DIFFUSERS_TIME_SCALE:
            raise ValueError("a student with its own time scale needs few-step times to export")
        return dict(teacher_scheduler), {}
    ts = [float(t) for t in timesteps]
    if not all(0.0 < t <= 1.0 for t in ts) or any(b >= a for a, b in itertools.pairwise(ts)):
        raise ValueError(f"student times {ts} are not decreasing flow times in (0, 1]")
    config = {
        **{k: v for k, v in teacher_scheduler.items() if not k.startswith("_")},
        "_class_name": FLOW_SCHEDULER,
        **_SIGMA_OPTIONS_OFF,
        "stochastic_sampling": stochastic and len(ts) > 1,
    }
    if time_scale != DIFFUSERS_TIME_SCALE:
        if time_scale != int(time_scale) or time_scale < 1:
            raise ValueError(
                f"time scale {time_scale}: the scheduler's num_train_timesteps carries it, a whole number >= 1"
            )
        # timesteps = time_scale x sigma: what the student embeds
        config["num_train_timesteps"] = int(time_scale)
    call = {"num_inference_steps": 1} if ts == [1.0] else {"sigmas": ts}
    return config, call


def teacher_call(pipeline: str, embedded: bool, steps: int, scale: float | None) -> dict[str, Any]:
    """The call that samples as jdistill's teacher sampler: ``steps`` Euler steps at the pipeline's own sigmas,
    CFG ``scale`` (convention "uncond") through FLUX's guidance embedding, FluxPipeline's true CFG against the
    empty prompt (no embedding), or SD3's CFG (its default negative prompt is the empty one)."""
    w = 1.0 if scale is None else float(scale)
    call: dict[str, Any] = {"num_inference_steps": int(steps), "guidance_scale": w}
    if pipeline == "FluxPipeline" and not embedded:
        call["guidance_scale"] = 1.0
        if w != 1.0:
            call.update(true_cfg_scale=w, negative_prompt="")
    return call


def export_flow_pipeline(
    src: str,
    dst: str,
    state: Mapping[str, Any],
    *,
    timesteps: tuple[float, ...] = (),
    stochastic: bool = True,
    guidance: float | None = None,
    input_scale: float = 1.0,
    max_sequence_length: int | None = None,
    dtype: str = "float32",
    variant: str | None = None,
    info: Mapping[str, Any] | None = None,
    lora_state: Mapping[str, Any] | None = None,
    teacher_sampler: tuple[int, float | None] | None = None,
    time_scale: float = DIFFUSERS_TIME_SCALE,
    meanflow: bool = False,
) -> dict[str, Any]:
    """Write the teacher's flow pipeline at ``src`` to ``dst`` with the transformer's diffusers state dict
    ``state`` (and, for an unmerged LoRA student, ``lora_state`` as ``pytorch_lora_weights.safetensors``).

    ``guidance``: the CFG scale w (convention "cond") a guidance-distilled FLUX student is sampled with: its
    guidance embedding then gets w + 1; None gives 1 (no guidance), as jdistill's student sampler does.
    ``teacher_sampler``: (steps, CFG scale in convention "uncond" or None) of a model sampled as its teacher
    (no ``timesteps``), e.g. a fine-tune. ``time_scale``: the factor a FLUX student takes its time and guidance
    inputs with (its ``timestep_scale``; diffusers' 1000). ``meanflow``: ``state`` holds a MeanFlow FLUX student's
    t - r embedder, written with the transformer class of ``meanflow_flux.py`` (Euler steps at ``timesteps``).
    Returns what was written to ``dst/jdistill_export.json``: the call
    arguments that run the student's sampler.
    """
    index_path = os.path.join(src, "model_index.json")
    if not os.path.exists(index_path):
        raise ConversionError(f"{src} has no model_index.json: not a pipeline directory")
    model_index = read_json(index_path)
    pipeline = model_index.get("_class_name")
    if pipeline not in FLOW_PIPELINES:
        raise ConversionError(f"{src} holds a {pipeline}, not one of {FLOW_PIPELINES}")
    if paths.is_nonempty_dir(dst):
        raise FileExistsError(f"export destination {dst} exists and is not empty; choose a new directory")
    transformer_config = read_json(os.path.join(src, "transformer", "config.json"))
    embedded = pipeline == "FluxPipeline" and bool(transformer_config.get("guidance_embeds"))
    if guidance is not None and not embedded:
        raise ValueError(
            f"guidance {guidance} for the student, but its transformer has no guidance embedding"
        )
    teacher_scheduler = read_json(os.path.join(src, "scheduler", "scheduler_config.json"))
    if time_scale != DIFFUSERS_TIME_SCALE and pipeline != "FluxPipeline":
        raise ValueError(
            f"time_scale {time_scale}: only a FLUX transformer takes its time with another scale"
        )
    if meanflow and not (pipeline == "FluxPipeline" and timesteps and not stochastic):
        raise ValueError("a MeanFlow transformer exports to a FluxPipeline with its times and Euler steps")
    # The MeanFlow class rescales its inputs itself; the plain class takes the scale through the scheduler.
    plan_scale = DIFFUSERS_TIME_SCALE if meanflow else time_scale
    scheduler, call = flow_scheduler_plan(teacher_scheduler, tuple(timesteps), stochastic, plan_scale)
    if meanflow:
        transformer_config = {
            **transformer_config,
            "_class_name": MEANFLOW_CLASS,
            "timestep_delta_embeds": True,
            "timestep_scale": float(time_scale),
            "meanflow_times": [float(t) for t in timesteps],
        }
        model_index = {**model_index, "transformer": [MEANFLOW_MODULE, MEANFLOW_CLASS]}

    out = paths.as_path(dst)
    out.mkdir(parents=True, exist_ok=True)
    write_teacher_components(src, out, model_index, ("transformer", "scheduler"), variant)
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    write_json(out / "transformer" / "config.json", transformer_config)
    save_weights(out / "transformer", state, dtype, "diffusion_pytorch_model")
    if meanflow:
        source = pathlib.Path(__file__).with_name(f"{MEANFLOW_MODULE}.py")
        (out / "transformer" / f"{MEANFLOW_MODULE}.py").write_text(source.read_text())
    write_scheduler(out, model_index, scheduler)

    if call:
        # FLUX-dev/lite embed the guidance (1: none); SD3 runs no CFG at 1. Neither takes a negative prompt.
        # The pipeline's guidance reaches the transformer times 1000; the student embeds its input times k.
        value = 1.0 if guidance is None else float(guidance) + 1.0
        call["guidance_scale"] = value * plan_scale / DIFFUSERS_TIME_SCALE if embedded else value
    elif teacher_sampler is not None:
        call = teacher_call(pipeline, embedded, *teacher_sampler)
    if call and max_sequence_length:
        call["max_sequence_length"] = int(max_sequence_length)
    record = {
        "call": call,
        "pipeline": pipeline,
        "scheduler": scheduler["_class_name"],
        "prediction": "velocity",
        "student_timesteps": [float(t) for t in timesteps],
        "latents_scale": float(
            input_scale
        ),  # initial latents = this x randn (the pipeline's own noise is 1x)
        "transformer_dtype": dtype,
        "teacher_source": str(paths.absolute(src)),
        **dict(info or {}),
    }
    if meanflow:
        record["load"] = (
            "DiffusionPipeline.from_pretrained(dst, trust_remote_code=True): the transformer is "
            f"transformer/{MEANFLOW_MODULE}.py's {MEANFLOW_CLASS}"
        )
    if lora_state is not None:
        save_weights(dst, lora_state, dtype, LORA_FILE.removesuffix(".safetensors"))
        record["load_lora_weights"] = str(dst)
    write_json(out / EXPORT_MARKER, record)
    return record
