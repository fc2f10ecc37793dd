"""Exporting a trained run: a diffusers pipeline for UNet teachers, flat safetensors otherwise."""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from jdistill import configuration, parallel, paths
from jdistill.convert.export import EXPORT_DTYPES, export_lora_pipeline, export_pipeline
from jdistill.models.lora import LoRANet

log = logging.getLogger(__name__)
PyTree = Any


def export_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    dst: str | None = None,
    *,
    dtype: str = "float32",
    lora_merged: bool = False,
    trained=None,
) -> str:
    """Export the latest checkpoint of the run in ``workdir`` to ``dst`` (default ``workdir/export``).

    The sampling network is taken as sampling uses it (its EMA when ``sample.use_ema``). With a diffusers
    teacher the result is a pipeline directory that ``DiffusionPipeline.from_pretrained`` loads (a LoRA
    student as the teacher plus ``pytorch_lora_weights.safetensors``, or merged with ``lora_merged``); with other
    teachers each sampling network is written as flat safetensors with the run's config. ``trained`` (a
    ``train.Trained`` of this run, just finished) supplies the setup and state instead of building the world
    and restoring the checkpoint again.
    """
    from jdistill import train

    if dtype not in EXPORT_DTYPES:
        raise configuration.ConfigError(f"export dtype {dtype!r}; choose one of {EXPORT_DTYPES}")
    dst = dst or str(paths.as_path(workdir) / "export")
    if trained is not None and trained.setup is not None:
        s, state, step = trained.setup, trained.state, trained.step
    else:
        s, state, step = train.restore_latest(config, workdir)
    params = parallel.to_host(train.sampling_params(s, state))
    if not parallel.is_main_process():
        return dst
    if s.world.source is None:
        return _export_flat(config, s.recipe.sample_with, params, dst, step)
    if s.recipe.no_diffusers_export:
        raise configuration.ConfigError(f"method {config.method.name!r}: {s.recipe.no_diffusers_export}")
    (name,) = s.recipe.sample_with
    if config.networks[name].model.arch != "teacher":
        raise configuration.ConfigError(
            f"network {name!r} has arch {config.networks[name].model.arch!r}; only students with the teacher's "
            "architecture (model.arch='teacher') export to a diffusers pipeline"
        )
    info = {
        "method": config.method.name,
        "step": step,
        "ema": bool(config.sample.use_ema),
        "workdir": workdir,
    }
    if config.teacher.kind == "flow":
        record = _export_flow(config, s, params, name, dst, info, dtype=dtype, lora_merged=lora_merged)
        log.info("exported step %d to %s; generate with pipe(prompt, **%s)", step, dst, record["call"])
        return dst
    common = {
        "prediction": config.networks[name].prediction,
        "timesteps": s.recipe.student_timesteps,
        "boundary": s.recipe.consistency_boundary,
        "guidance": s.recipe.student_guidance,
        "input_scale": s.recipe.student_input_scale,
        "dtype": dtype,
        "variant": config.teacher.variant or None,
        "info": info,
    }
    net = s.recipe.network(name).net
    if isinstance(net, LoRANet):  # the teacher's UNet plus the adapters, as a LoRA file or merged
        record = export_lora_pipeline(
            s.world.source, dst, params["teacher"], params[name], net.config, merged=lora_merged, **common
        )
    else:
        extra = config.networks[name].model.get("time_cond_proj_dim", 0)  # LCM's guidance embedding
        changes = {"time_cond_proj_dim": extra} if extra else None
        record = export_pipeline(s.world.source, dst, params[name], unet_changes=changes, **common)
    log.info("exported step %d to %s; generate with pipe(prompt, **%s)", step, dst, record["call"])
    return dst


def _export_flow(
    config, s, params, name: str, dst: str, info: dict, *, dtype: str, lora_merged: bool
) -> dict:
    """A FLUX / SD3 transformer student into the teacher's FluxPipeline / StableDiffusion3Pipeline."""
    from jdistill.convert.export import component_state_dict
    from jdistill.convert.export_flow import export_flow_pipeline
    from jdistill.convert.io import read_json
    from jdistill.models.flux import DIFFUSERS_TIME_SCALE
    from jdistill.models.lora import lora_state_dict, merge_lora
    from jdistill.teachers.flow_world import t5_length
    from jdistill.teachers.presets import FlowTeacherPreset, get_preset

    cls = read_json(str(paths.as_path(s.world.source) / "model_index.json"))["transformer"][1]
    net = s.recipe.network(name).net
    lora_state = None
    if isinstance(net, LoRANet) and lora_merged:
        state = component_state_dict(cls, merge_lora(params["teacher"], params[name], net.config))
    elif isinstance(net, LoRANet):  # the teacher's transformer plus a peft LoRA file on it
        state = component_state_dict(cls, params["teacher"])
        rename = None
        if cls == "SD3Transformer2DModel":  # the joint blocks' diffusers numbering
            from jdistill.convert.sd3 import block_runs, to_checkpoint_key

            rename = to_checkpoint_key(*block_runs(params["teacher"]))
        lora_state = lora_state_dict(params[name], net.config, "transformer.", rename)
    else:
        own = s.recipe.export_params(params[name]) if s.recipe.export_params else params[name]
        state = component_state_dict(cls, own)
    return export_flow_pipeline(
        s.world.source,
        dst,
        state,
        timesteps=s.recipe.flow_times or s.recipe.student_timesteps,
        stochastic=s.recipe.flow_update == "renoise",
        guidance=s.recipe.student_guidance,
        input_scale=s.recipe.student_input_scale,
        max_sequence_length=t5_length(config, get_preset(config.teacher.preset, FlowTeacherPreset)),
        dtype=dtype,
        variant=config.teacher.variant or None,
        info=info,
        lora_state=lora_state,
        teacher_sampler=_teacher_sampler(config),
        time_scale=float(getattr(net.config, "timestep_scale", DIFFUSERS_TIME_SCALE)),
        # A MeanFlow FLUX student whose t - r embedding is not folded away keeps its embedder.
        meanflow=bool(getattr(net.config, "timestep_delta_embeds", False)) and s.recipe.export_params is None,
    )


def _teacher_sampler(config) -> tuple[int, float | None] | None:
    """(steps, CFG in convention "uncond") of a recipe that samples its model as a teacher (sft), else None."""
    sampler = config.method.get("sampler")
    if sampler is None:
        return None
    scale = sampler.get("guidance_scale")
    if scale is not None and sampler.get("cfg_convention", "uncond") == "cond":
        scale = float(scale) + 1.0
    return int(sampler.steps), scale


def _export_flat(config, names: tuple[str, ...], params: dict[str, PyTree], dst: str, step: int) -> str:
    from safetensors.numpy import save

    out = paths.as_path(dst)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        flat = {
            ".".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params[name])[0]
        }
        (out / f"{name}.safetensors").write_bytes(save(flat, metadata={"step": str(step)}))
    (out / "config.json").write_text(configuration.to_json(config))
    return dst
