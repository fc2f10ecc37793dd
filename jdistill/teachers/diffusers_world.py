"""The world of a diffusers UNet teacher (SD1.5, SD2.1, SDXL): latents, prompts, VAE-decoded samples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdistill.convert.pipeline import load_pipeline
from jdistill.diffusion.denoiser import NetworkDenoiser
from jdistill.diffusion.schedules import VPSchedule
from jdistill.models.layers import Precision
from jdistill.teachers.base import World
from jdistill.teachers.presets import UNCOND_RULES, get_preset
from jdistill.teachers.prompts import PromptEncoder, PromptSource, read_prompts
from jdistill.visualize import image_grid_png

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def diffusers_teacher_config(preset: str = "sd15") -> ml_collections.ConfigDict:
    """The ``teacher`` section for a diffusers UNet teacher."""
    return ml_collections.ConfigDict(
        {
            "kind": "diffusers",
            "preset": preset,
            "path": "",  # local pipeline directory, converted directory or hub id; empty: the preset's hub id
            "variant": "",  # e.g. "fp16" to read diffusion_pytorch_model.fp16.safetensors
            "allow_pickle": False,
            "dtype": "float32",  # compute dtype of the frozen networks
            "param_dtype": "float32",  # storage dtype of the frozen networks
            "attention_impl": "xla",
            "remat": False,
            "resolution": 0,  # image side in pixels; 0: the preset's
            "uncond": "",  # "empty_prompt" or "zeros"; empty: the preset's rule
            "prompts": "",  # text file, one prompt per line
            "eval_prompts": "",  # text file for samples and evaluation; empty: the training prompts
        }
    )


def build(config: ml_collections.ConfigDict, shardings_for=None) -> World:
    t = config.teacher
    preset = get_preset(t.preset)
    for key, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("uncond", ("", *UNCOND_RULES))):
        if t[key] not in allowed:
            raise ValueError(f"teacher.{key}={t[key]!r}; choose one of {list(allowed)}")
    if not t.prompts:
        raise ValueError("teacher.prompts must name a text file with one prompt per line")
    precision = Precision(dtype=DTYPES[t.dtype], param_dtype=DTYPES[t.param_dtype])
    pipe = load_pipeline(
        t.path or preset.hub_id,
        variant=t.variant or None,
        allow_pickle=t.allow_pickle,
        precision=precision,
        attention_impl=t.attention_impl,
        remat=t.remat,
        shardings=shardings_for,
    )
    if pipe.prediction != preset.prediction:
        raise ValueError(
            f"teacher preset {preset.name!r} predicts {preset.prediction!r}, but {pipe.path}'s scheduler says "
            f"{pipe.prediction!r}: pick the preset that matches the checkpoint"
        )
    missing = [name for name, _ in preset.encoders if name not in pipe.components] + [
        name for name in ("unet", "vae") if name not in pipe.components
    ]
    if missing:
        raise ValueError(f"{pipe.path} lacks components {missing} that preset {preset.name!r} needs")

    sched = pipe.scheduler_config
    schedule = VPSchedule.from_betas(
        sched.get("beta_schedule", "scaled_linear"),
        sched.get("beta_start", 0.00085),
        sched.get("beta_end", 0.012),
        sched.get("num_train_timesteps", 1000),
    )
    unet, vae = pipe.components["unet"], pipe.components["vae"]
    teacher = NetworkDenoiser(unet.net, pipe.prediction, schedule)

    resolution = t.resolution or preset.resolution
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    side = resolution // factor
    sample_shape = (side, side, unet.config.get("in_channels", 4))

    time_ids = (resolution, resolution, 0, 0, resolution, resolution) if preset.pooled_from else None
    encoder = PromptEncoder(
        tuple((name, pipe.components[name].net, layer) for name, layer in preset.encoders),
        pipe.tokenizers,
        preset.pooled_from,
        time_ids,
    )
    frozen = {"teacher": unet.params, "vae": vae.params}
    nets = {"teacher": unet.net, "vae": vae.net}
    for name, _ in preset.encoders:
        frozen[name] = pipe.components[name].params
        nets[name] = pipe.components[name].net

    def prepare(params, batch):
        ids = {k: v for k, v in batch.items() if k.startswith("input_ids.")}
        rest = {k: v for k, v in batch.items() if not k.startswith("input_ids.")}
        return {**rest, "cond": encoder.encode(params, ids)}

    uncond_rule = t.uncond or preset.uncond
    empty = jax.jit(encoder.encode)(frozen, encoder.tokenize([""]))
    if uncond_rule == "zeros":  # SDXL recipes: zero prompt and pooled embeddings, same micro-conditioning
        uncond = {k: (v if k == "time_ids" else jnp.zeros_like(v)) for k, v in empty.items()}
    else:
        uncond = empty
    uncond = jax.tree.map(np.asarray, uncond)

    prompts = tuple(read_prompts(t.prompts))
    eval_prompts = tuple(read_prompts(t.eval_prompts)) if t.eval_prompts else prompts

    def eval_batch(n: int) -> dict[str, np.ndarray]:
        return encoder.tokenize([eval_prompts[i % len(eval_prompts)] for i in range(n)])

    decode = jax.jit(lambda p, z: vae.net.apply(p, z, method="images_from_latents"))

    def save_samples(stem: str, samples: np.ndarray, batch: dict) -> None:
        np.save(f"{stem}.npy", samples)
        shown = samples[:64]
        images = np.concatenate(
            [np.asarray(decode(frozen["vae"], shown[i : i + 8])) for i in range(0, len(shown), 8)]
        )
        image_grid_png(f"{stem}.png", images)

    def evaluate(samples: np.ndarray, batch: dict) -> dict[str, float]:
        # Image metrics (FID, CLIP score) come with the evaluation module; here: finite and latent statistics.
        flat = samples.reshape(len(samples), -1)
        return {
            "finite": float(np.isfinite(flat).all(axis=1).mean()),
            "latent_std": float(np.nanstd(flat)),
            "latent_mean": float(np.nanmean(flat)),
        }

    return World(
        teacher=teacher,
        frozen=frozen,
        frozen_axes={name: net.logical_axes for name, net in nets.items()},
        nets=nets,
        sample_shape=sample_shape,
        uncond=uncond,
        conditions=PromptSource(prompts, encoder.tokenize, seed=config.seed),
        data=None,
        num_classes=0,
        eval_batch=eval_batch,
        evaluate=evaluate,
        save_samples=save_samples,
        prepare=prepare,
        source=pipe.path,
    )
