"""Writing a trained UNet back into a diffusers pipeline directory.

The student's UNet is written with the inverse conversion tables (``to_state_dict``), the teacher's other
components are taken from the teacher's source directory (copied as files from a diffusers directory, or
written from Flax parameters when the source is a directory made by ``tools/convert_teacher.py``), and the
scheduler is chosen so that ``DiffusionPipeline.from_pretrained(dst)`` runs the student's own sampler:

- one step: ``DDIMScheduler`` with trailing spacing and ``set_alpha_to_one``; its single step returns the
  predicted x0 exactly. A step at another timestep T, or from latents s z rather than z (SiD-LSG's sigma_T z),
  is folded into that plain ``num_inference_steps=1`` call (``OneStepFold``): the schedule is cut after T, its
  last beta set, and the UNet's conv_in / conv_out rescaled (recorded in ``jdistill_export.json``);
- several steps (predict x0, re-noise with fresh noise at the next timestep): ``LCMScheduler`` with
  ``original_inference_steps`` = the step count (its default timesteps are then 999, 999 - 1000/k, ...) and a
  huge ``timestep_scaling`` so that its boundary condition reduces to c_skip = 0, c_out = 1;
- no few-step timesteps (e.g. an ``sft`` fine-tune): the teacher's scheduler with the new prediction type;
- a consistency model (LCM: the sampler takes c_skip x_t + c_out x0 with sigma_d = 0.5 and a timestep scaling,
  10 in LCM's scripts): ``LCMScheduler`` with that ``timestep_scaling``, for one step as well.

A student with LCM's guidance embedding (``time_cond_proj_dim``) is called with guidance_scale = w + 1: diffusers'
pipelines then embed w = guidance_scale - 1 as ``timestep_cond`` and run no classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jdistill import paths
from jdistill.convert.core import ConversionError, to_state_dict
from jdistill.convert.io import read_json

PyTree = Any
EXPORT_MARKER = "jdistill_export.json"
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
SCHEDULER_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# LCM's boundary condition is c_skip = s^2 / ((t k)^2 + s^2) with s = 0.5; k = 1e6 makes it < 1e-13 at t >= 1.
LCM_TIMESTEP_SCALING = 1e6
LCM_SIGMA_DATA = 0.5  # fixed in diffusers' LCMScheduler
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def component_state_dict(cls: str, params: PyTree) -> dict[str, np.ndarray]:
    """The diffusers/transformers state dict of a converted pipeline component of class ``cls``."""
    import importlib

    from jdistill.convert.pipeline import EXPORTERS

    if cls not in EXPORTERS:
        raise ConversionError(f"no export table for {cls}; jdistill writes {sorted(EXPORTERS)}")
    module, function = EXPORTERS[cls]
    return getattr(importlib.import_module(f"jdistill.convert.{module}"), function)(params)


def cast_state_dict(state: Mapping[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """Cast floating tensors to ``dtype`` ("float32", "float16", "bfloat16") as torch tensors for saving.

    bfloat16 has no numpy dtype that safetensors' numpy writer accepts, so tensors go through torch.
    """
    import torch

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; choose one of {EXPORT_DTYPES}")
    target = getattr(torch, dtype)
    out = {}
    for key, value in state.items():
        # np.array copies: a writable, contiguous array, as torch.from_numpy wants.
        out[key] = torch.from_numpy(np.array(value, np.float32)).to(target)
    return out


def save_weights(folder: str | os.PathLike, state: Mapping[str, np.ndarray], dtype: str, stem: str) -> str:
    """``folder/stem.safetensors`` in ``dtype``; float32 and float16 are written without torch (the digits
    world's main job runs on the core install), bfloat16 through torch. A remote folder (``gs://``) gets the
    file serialised in memory and written whole; a local one is written directly."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; choose one of {EXPORT_DTYPES}")
    paths.as_path(folder).mkdir(parents=True, exist_ok=True)
    path = str(paths.as_path(folder) / f"{stem}.safetensors")
    if dtype == "bfloat16":
        from safetensors import torch as writer

        tensors = cast_state_dict(state, dtype)
    else:
        from safetensors import numpy as writer

        tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(dtype)) for k, v in state.items()}
    if paths.is_remote(path):
        paths.as_path(path).write_bytes(writer.save(tensors, metadata={"format": "pt"}))
    else:
        writer.save_file(tensors, path, metadata={"format": "pt"})
    return path


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    paths.as_path(path).write_text(json.dumps(dict(data), indent=2, sort_keys=True) + "\n")


@dataclasses.dataclass(frozen=True)
class OneStepFold:
    """A one-step student's sampler as DDIM's single trailing step, called with ``num_inference_steps=1``.

    The student maps x = s z (s = ``conv_in``: 1 for plain noise, sigma_T for SiD-LSG's input), labelled T,
    to x0 = convert(f(x)). DDIM with trailing spacing takes its one step at ``num_train_timesteps - 1`` on the
    pipeline's latents z and, with alpha_prev = 1, returns x0' = (z - sqrt(1 - a) f') / sqrt(a) for eps
    (sqrt(a) z - sqrt(1 - a) f' for v, f' for x0), a being its alphas_cumprod there. Matching x0' = x0 for
    every z fixes a; so the schedule is cut after T (its last timestep is then T), its last beta sets a, and the
    UNet's linear ends absorb the rest: conv_in's kernel times s (f sees s z), conv_out's kernel and bias times
    ``conv_out`` (f' = conv_out f).
    """

    timestep: int
    betas: tuple[float, ...] | None = None  # None: the teacher's schedule unchanged
    conv_in: float = 1.0
    conv_out: float = 1.0

    @property
    def changes_weights(self) -> bool:
        return self.conv_in != 1.0 or self.conv_out != 1.0


def teacher_betas(scheduler: Mapping[str, Any]) -> np.ndarray | None:
    """The teacher scheduler's betas in float64, or None for a beta schedule we do not compute."""
    from jdistill.diffusion.schedules import BETA_SCHEDULES, make_betas

    if scheduler.get("trained_betas") is not None:
        return np.asarray(scheduler["trained_betas"], np.float64)
    kind = scheduler.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES or scheduler.get("rescale_betas_zero_snr"):
        return None
    return make_betas(
        kind,
        scheduler.get("beta_start", 0.0001),
        scheduler.get("beta_end", 0.02),
        int(scheduler.get("num_train_timesteps", 1000)),
    )


def one_step_fold(
    teacher_scheduler: Mapping[str, Any], prediction: str, timestep: int, input_scale: float = 1.0
) -> OneStepFold | None:
    """How ``OneStepFold`` runs this student, or None where it cannot (a would leave (0, 1): eps with
    alpha_T >= s; or a schedule we do not compute): such students keep the ``timesteps=[T]`` call."""
    n_train = int(teacher_scheduler.get("num_train_timesteps", 1000))
    if timestep == n_train - 1 and input_scale == 1.0:
        return OneStepFold(timestep)
    betas = teacher_betas(teacher_scheduler)
    if betas is None or not 0 <= timestep < len(betas):
        return None
    if input_scale == 1.0:  # the teacher's own coefficients at T: only the schedule is cut
        return OneStepFold(timestep, tuple(float(b) for b in betas[: timestep + 1]))
    abar = np.cumprod(1.0 - betas)
    alpha, sigma, s = math.sqrt(abar[timestep]), math.sqrt(1.0 - abar[timestep]), float(input_scale)
    a = {"eps": (alpha / s) ** 2, "v": (alpha * s) ** 2, "x0": float(abar[timestep])}[prediction]
    if not 0.0 < a < 1.0:
        return None
    conv_out = {"eps": sigma / (s * math.sqrt(1 - a)), "v": sigma / math.sqrt(1 - a), "x0": 1.0}[prediction]
    previous = float(abar[timestep - 1]) if timestep > 0 else 1.0
    last = 1.0 - a / previous  # may be negative (a above the teacher's abar[T-1]); diffusers takes it as is
    return OneStepFold(timestep, (*(float(b) for b in betas[:timestep]), last), s, conv_out)


def fold_unet(state: Mapping[str, np.ndarray], fold: OneStepFold) -> dict[str, np.ndarray]:
    """A diffusers UNet state dict with ``fold``'s factors on conv_in's kernel and conv_out (float64 products
    rounded once to the tensors' dtype)."""
    out = dict(state)
    factors = {
        "conv_in.weight": fold.conv_in,
        "conv_out.weight": fold.conv_out,
        "conv_out.bias": fold.conv_out,
    }
    for key, factor in factors.items():
        if key not in out:
            raise ConversionError(f"cannot fold the one-step sampler into the UNet: it has no {key}")
        value = np.asarray(out[key])
        out[key] = (value.astype(np.float64) * factor).astype(value.dtype)
    return out


def scheduler_plan(
    teacher_scheduler: Mapping[str, Any],
    prediction: str,
    timesteps: tuple[float, ...],
    boundary: tuple[float, float] | None = None,
    input_scale: float = 1.0,
) -> tuple[dict[str, Any], dict[str, Any], OneStepFold | None]:
    """(scheduler config, call arguments, fold): diffusers reproduces the student's sampler with that scheduler
    and call, on a UNet carrying the fold's factors (``fold_unet``) when there is a fold.

    ``boundary``: (sigma_data, timestep_scaling) of a consistency student's sampler (``Recipe.consistency_boundary``);
    ``input_scale``: the student's first input is this times unit noise (``Recipe.student_input_scale``). A
    one-step student's call is ``num_inference_steps=1`` when ``one_step_fold`` applies.
    """
    if boundary is not None and boundary[0] != LCM_SIGMA_DATA:
        raise ValueError(
            f"diffusers' LCMScheduler fixes sigma_data = {LCM_SIGMA_DATA}; this student's boundary condition has "
            f"sigma_data = {boundary[0]}"
        )
    if prediction not in SCHEDULER_PREDICTIONS:
        raise ValueError(
            f"cannot export a student predicting {prediction!r}; diffusers knows {list(SCHEDULER_PREDICTIONS)}"
        )
    base = {k: teacher_scheduler[k] for k in _SCHEDULE_KEYS if k in teacher_scheduler}
    version = teacher_scheduler.get("_diffusers_version", "0.42.1")
    kind = SCHEDULER_PREDICTIONS[prediction]
    if not timesteps:
        config = dict(teacher_scheduler)
        config["prediction_type"] = kind
        return config, {}, None
    n_train = int(base.get("num_train_timesteps", 1000))
    steps = [round(t) for t in timesteps]
    if any(abs(t - s) > 1e-6 for t, s in zip(timesteps, steps, strict=True)):
        raise ValueError(
            f"student timesteps {timesteps} are not integers; diffusers schedulers need integers"
        )
    k = len(steps)
    one_step = k == 1 and boundary is None
    fold = one_step_fold(teacher_scheduler, prediction, steps[0], input_scale) if one_step else None
    if fold is not None:
        if fold.betas is not None:  # the schedule cut after T, so that trailing spacing's one step is at T
            base = {**base, "num_train_timesteps": len(fold.betas), "trained_betas": list(fold.betas)}
        config = {
            "_class_name": "DDIMScheduler",
            "_diffusers_version": version,
            **base,
            "clip_sample": False,
            "set_alpha_to_one": True,
            "steps_offset": 1,  # unused by trailing spacing and by LCM; 1 keeps diffusers from warning
            "prediction_type": kind,
            "timestep_spacing": "trailing",
            "thresholding": False,
            "rescale_betas_zero_snr": False,
        }
        return config, {"num_inference_steps": 1}, fold
    config = {
        "_class_name": "LCMScheduler",
        "_diffusers_version": version,
        **base,
        "original_inference_steps": k,
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 1,  # unused by trailing spacing and by LCM; 1 keeps diffusers from warning
        "prediction_type": kind,
        "timestep_spacing": "leading",
        "timestep_scaling": LCM_TIMESTEP_SCALING if boundary is None else float(boundary[1]),
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }
    default = [(n_train // k) * i - 1 for i in range(k, 0, -1)]  # LCM's timesteps for this step count
    call = {"num_inference_steps": k} if steps == default else {"timesteps": steps}
    return config, call, None


def copy_component(src: str, dst: str, variant: str | None = None) -> None:
    """Copy a component folder; with a variant, its variant weights become the plain-named weights.
    Files are streamed (``paths.copy_file``): ``dst`` may be on another store than ``src`` (``gs://``)."""
    src_dir, dst_dir = paths.as_path(src), paths.as_path(dst)
    dst_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in src_dir.iterdir())
    tag = f".{variant}" if variant else None
    chosen: dict[str, str] = {}
    for name in names:
        if (src_dir / name).is_dir():
            paths.copy_tree(src_dir / name, dst_dir / name)
            continue
        target = name.replace(tag, "") if tag and tag in name else name
        if target in chosen and tag and tag not in name:
            continue  # a variant file already provides this name
        chosen[target] = name
    for target, name in chosen.items():
        if tag and tag in name and name.endswith(".json") and ".index" in name:  # sharded: rename the shards
            index = json.loads((src_dir / name).read_text())
            index["weight_map"] = {k: v.replace(tag, "") for k, v in index["weight_map"].items()}
            write_json(dst_dir / target, index)
        else:
            paths.copy_file(src_dir / name, dst_dir / target)


def write_scheduler(out, model_index: dict[str, Any], scheduler: Mapping[str, Any]) -> None:
    """The student's scheduler config in ``out/scheduler`` and the pipeline's ``model_index.json`` naming it."""
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    model_index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    write_json(out / "model_index.json", model_index)


def write_teacher_components(
    src: str, out, model_index: Mapping[str, Any], skip: tuple[str, ...], variant: str | None
) -> None:
    """Every component of the teacher pipeline at ``src`` but ``skip`` into ``out``: copied as files, or, for a
    directory made by ``tools/convert_teacher.py`` (Flax parameters), written as diffusers/transformers
    weights in float32 from the converted parameters."""
    from jdistill.convert.pipeline import CONVERTED_MARKER, EXPORTERS, load_pipeline

    converted = os.path.exists(os.path.join(src, CONVERTED_MARKER))
    for name, spec in model_index.items():
        if name.startswith("_") or name in skip or spec in (None, [None, None]):
            continue
        folder = os.path.join(src, name)
        if not os.path.isdir(folder):
            continue
        library, cls = spec
        if converted and cls in EXPORTERS:
            component = load_pipeline(src, components=(name,), allow_download=False).components[name]
            (out / name).mkdir(parents=True, exist_ok=True)
            write_json(out / name / "config.json", component.config)
            stem = "model" if library == "transformers" else "diffusion_pytorch_model"
            save_weights(out / name, component_state_dict(cls, component.params), "float32", stem)
        else:
            copy_component(folder, str(out / name), variant)


def export_pipeline(
    src: str,
    dst: str,
    unet_params: PyTree,
    *,
    prediction: str,
    timesteps: tuple[float, ...] = (),
    unet_config: Mapping[str, Any] | None = None,
    unet_changes: Mapping[str, Any] | None = None,
    boundary: tuple[float, float] | None = None,
    guidance: float | None = None,
    input_scale: float = 1.0,
    dtype: str = "float32",
    variant: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a diffusers pipeline to ``dst``: the teacher's pipeline at ``src`` with the UNet replaced.

    ``unet_config`` defaults to the teacher's UNet config (a student with the teacher's architecture), updated
    with ``unet_changes`` (e.g. LCM's ``time_cond_proj_dim``). ``boundary``: a consistency student's
    (sigma_data, timestep_scaling); ``guidance``: the w (convention "cond") a student with a guidance
    embedding is sampled with; ``input_scale``: the student's first input is this times unit noise (folded into
    the UNet for one-step students, see ``OneStepFold``; otherwise recorded as ``latents_scale``, the factor to
    give the pipeline's ``latents``). Returns what was written to ``dst/jdistill_export.json``: the call
    arguments that run the student's sampler, the scheduler chosen, and ``info``.
    """
    index_path = os.path.join(src, "model_index.json")
    if not os.path.exists(index_path):
        raise ConversionError(f"{src} has no model_index.json: not a pipeline directory")
    if paths.is_nonempty_dir(dst):
        raise FileExistsError(f"export destination {dst} exists and is not empty; choose a new directory")
    model_index = read_json(index_path)
    teacher_unet_config = read_json(os.path.join(src, "unet", "config.json"))
    config = {**(unet_config if unet_config is not None else teacher_unet_config), **dict(unet_changes or {})}
    if guidance is not None and not config.get("time_cond_proj_dim"):
        raise ValueError(f"guidance {guidance} for the student, but its UNet has no time_cond_proj_dim")
    teacher_scheduler = read_json(os.path.join(src, "scheduler", "scheduler_config.json"))
    scheduler, call, fold = scheduler_plan(
        teacher_scheduler, prediction, tuple(timesteps), boundary, input_scale
    )
    out = paths.as_path(dst)
    out.mkdir(parents=True, exist_ok=True)

    write_teacher_components(src, out, model_index, ("unet", "scheduler"), variant)

    (out / "unet").mkdir(parents=True, exist_ok=True)
    write_json(out / "unet" / "config.json", config)
    state = to_state_dict(unet_params)
    if fold is not None and fold.changes_weights:
        state = fold_unet(state, fold)
    save_weights(out / "unet", state, dtype, "diffusion_pytorch_model")

    write_scheduler(out, model_index, scheduler)

    if call:
        # A distilled student runs without classifier-free guidance; one with a guidance embedding takes
        # w = guidance_scale - 1 through it (and diffusers then runs no CFG either).
        call["guidance_scale"] = 1.0 if guidance is None else float(guidance) + 1.0
    record = {
        "call": call,
        "scheduler": scheduler["_class_name"],
        "prediction": prediction,
        "student_timesteps": list(timesteps),
        # Initial latents = this x randn: 1 unless the student's input scale could not be folded into the UNet.
        "latents_scale": 1.0 if fold is not None else float(input_scale),
        "unet_dtype": dtype,
        "teacher_source": str(paths.absolute(src)),
        **dict(info or {}),
    }
    if fold is not None and fold.changes_weights:  # divide them out to recover the trained weights
        record["unet_folded"] = {
            "conv_in.weight": fold.conv_in,
            "conv_out.weight": fold.conv_out,
            "conv_out.bias": fold.conv_out,
        }
    write_json(out / EXPORT_MARKER, record)
    return record


LORA_FILE = "pytorch_lora_weights.safetensors"


def export_lora_pipeline(
    src: str,
    dst: str,
    base_params: PyTree,
    lora: Mapping[str, Mapping[str, Any]],
    lora_config,
    *,
    merged: bool,
    prediction: str,
    timesteps: tuple[float, ...] = (),
    boundary: tuple[float, float] | None = None,
    guidance: float | None = None,
    input_scale: float = 1.0,
    dtype: str = "float32",
    variant: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export a LoRA student (``models.lora``) on the base UNet ``base_params``.

    ``merged``: the UNet is written with the LoRA merged in. Otherwise the UNet is the base and the LoRA is
    written to ``dst/pytorch_lora_weights.safetensors`` (peft format) for ``pipe.load_lora_weights(dst)``.
    """
    from jdistill.models.lora import lora_state_dict, merge_lora

    info = {**dict(info or {}), "lora_rank": lora_config.rank, "lora_merged": merged}
    unet = merge_lora(base_params, lora, lora_config) if merged else base_params
    record = export_pipeline(
        src,
        dst,
        unet,
        prediction=prediction,
        timesteps=timesteps,
        boundary=boundary,
        guidance=guidance,
        input_scale=input_scale,  # a fold touches conv_in / conv_out only, which LoRA never adapts
        dtype=dtype,
        variant=variant,
        info=info,
    )
    if not merged:
        save_weights(dst, lora_state_dict(lora, lora_config), dtype, LORA_FILE.removesuffix(".safetensors"))
        record["load_lora_weights"] = str(dst)
        write_json(paths.as_path(dst) / EXPORT_MARKER, record)
    return record
