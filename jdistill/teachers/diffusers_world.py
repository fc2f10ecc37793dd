"""The world of a diffusers UNet teacher (SD1.5, SD2.1, SDXL): latents, prompts, VAE-decoded samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdistill.convert.pipeline import Pipeline, load_pipeline, prediction_type
from jdistill.data.embeddings import COND, EmbeddingCache
from jdistill.data.images import ImageTextSource, open_teacher_images
from jdistill.data.sources import DataSource
from jdistill.data.text import PromptSource, PromptTable, open_prompts
from jdistill.diffusion.denoiser import NetworkDenoiser
from jdistill.diffusion.schedules import VPSchedule
from jdistill.models.layers import DTYPES, Precision
from jdistill.models.net import Net
from jdistill.teachers.base import World
from jdistill.teachers.presets import UNCOND_RULES, TeacherPreset, get_preset
from jdistill.teachers.prompts import IDS, PromptEncoder


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
            "attention_impl": "xla",  # xla, chunked (memory-efficient), cudnn, splash (TPU) or auto
            "remat": "none",  # per block: "none", "attention", "dots" or "full" (jdistill/models/layers.py)
            "resolution": 0,  # image side in pixels; 0: the preset's
            "uncond": "",  # "empty_prompt" or "zeros"; empty: the preset's rule
            # Prompt tables: .txt (one per line), .jsonl, .parquet or array_record (file, directory or glob).
            "prompts": "",
            "eval_prompts": "",  # for samples and evaluation; empty: the training prompts
            "prompt_field": "",  # JSON field or column of the prompt; empty: "prompt", "text" or "caption"
            "embedding_cache": "",  # directory from tools/cache_embeddings.py: no text encoding per step
            "t5_length": 0,  # flow teachers: T5 tokens per prompt (max_sequence_length); 0: the preset's
            # Real images with captions (World.data; GAN terms): a folder with metadata.jsonl, .parquet or
            # array_record of JSON {"image": base64, "text": ...}, or "tfds:<name>" (a TFDS dataset prepared
            # in array_record: split tfds_split under tfds_dir, empty: TFDS's default). Empty: no data source.
            "data": "",
            "data_field": "",  # caption field or column; empty: "text", "caption" or "prompt"
            "data_image_field": "",  # image field or column; empty: "image", "jpg", "png" or "webp"
            "tfds_split": "train",
            "tfds_dir": "",
        }
    )


def load_components(
    config: ml_collections.ConfigDict,
    preset,
    components: tuple[str, ...],
    shardings_for=None,
    uncond_rules: tuple[str, ...] = UNCOND_RULES,
) -> Pipeline:
    """The teacher pipeline's ``components`` (checked settings, every one present), for this world and the
    flow world."""
    from jdistill.teachers.abstract import check_settings

    t = config.teacher
    check_settings(t, uncond_rules)
    pipe = load_pipeline(
        t.path or preset.hub_id,
        components=components,
        variant=t.variant or None,
        allow_pickle=t.allow_pickle,
        precision=Precision(dtype=DTYPES[t.dtype], param_dtype=DTYPES[t.param_dtype]),
        attention_impl=t.attention_impl,
        remat=t.remat,
        shardings=shardings_for,
    )
    missing = [name for name in components if name not in pipe.components]
    if missing:
        raise ValueError(f"{pipe.path} lacks components {missing} that preset {preset.name!r} needs")
    return pipe


def _load(config: ml_collections.ConfigDict, components: tuple[str, ...], shardings_for=None) -> Pipeline:
    preset = get_preset(config.teacher.preset)
    pipe = load_components(config, preset, components, shardings_for)
    if pipe.prediction != preset.prediction:
        raise ValueError(
            f"teacher preset {preset.name!r} predicts {preset.prediction!r}, but {pipe.path}'s scheduler says "
            f"{pipe.prediction!r}: pick the preset that matches the checkpoint"
        )
    return pipe


def _prompt_encoder(preset: TeacherPreset, pipe: Pipeline, resolution: int) -> PromptEncoder:
    time_ids = (resolution, resolution, 0, 0, resolution, resolution) if preset.pooled_from else None
    return PromptEncoder(
        tuple((name, pipe.components[name].net, layer) for name, layer in preset.encoders),
        pipe.tokenizers,
        preset.pooled_from,
        time_ids,
    )


def load_prompt_encoder(config: ml_collections.ConfigDict) -> tuple[PromptEncoder, dict, str]:
    """The teacher's prompt encoder with only the text encoders loaded: (encoder, their params, source)."""
    preset = get_preset(config.teacher.preset)
    pipe = _load(config, tuple(name for name, _ in preset.encoders))
    encoder = _prompt_encoder(preset, pipe, config.teacher.resolution or preset.resolution)
    return encoder, {name: pipe.components[name].params for name, _ in preset.encoders}, pipe.path


def training_prompts(config: ml_collections.ConfigDict) -> PromptTable:
    if not config.teacher.prompts:
        raise ValueError("teacher.prompts must name a prompt table (.txt, .jsonl, .parquet or array_record)")
    return open_prompts(config.teacher.prompts, config.teacher.prompt_field)


def _prepare_fn(encoder: PromptEncoder, vae: Net) -> Callable[[dict, dict], dict]:
    def prepare(params, batch):
        """Token ids -> conditioning (or cached conditioning "cond.<key>" as it is); uint8 images -> latents
        x0 from the VAE posterior mean (deterministic: a real image always maps to the same x0)."""
        out = {k: v for k, v in batch.items() if not k.startswith((IDS, COND)) and k != "images"}
        cached = {k[len(COND) :]: v.astype(jnp.float32) for k, v in batch.items() if k.startswith(COND)}
        ids = {k: v for k, v in batch.items() if k.startswith(IDS)}
        if cached:
            out["cond"] = cached if encoder is None else encoder.with_time_ids(cached)
        elif ids:
            out["cond"] = encoder.encode(params, ids)
        if "images" in batch:
            pixels = batch["images"].astype(jnp.float32) / 127.5 - 1.0
            out["x0"] = vae.apply(params["vae"], pixels, method="latents_from_images")
        return out

    return prepare


def _schedule(sched: dict) -> VPSchedule:
    return VPSchedule.from_betas(
        sched.get("beta_schedule", "scaled_linear"),
        sched.get("beta_start", 0.00085),
        sched.get("beta_end", 0.012),
        sched.get("num_train_timesteps", 1000),
    )


def _sample_shape(resolution: int, vae_config: dict, unet_config: dict) -> tuple[int, int, int]:
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    side = resolution // factor
    return (side, side, unet_config.get("in_channels", 4))


@dataclasses.dataclass(frozen=True)
class BuiltInSources:
    """Prompts and images a world generates itself (the digits world) instead of reading tables; each takes
    the teacher's ``tokenize``. ``eval_batch(tokenize, n)`` may add label arrays for the world's metrics."""

    conditions: Callable[[Callable], DataSource]
    data: Callable[[Callable], DataSource]
    eval_batch: Callable[[Callable, int], dict[str, np.ndarray]]
    eval_prompts: Callable[[int], list[str]] | None = None  # n -> the prompts of eval_batch(_, n)


@dataclasses.dataclass(frozen=True)
class Tables:
    """The prompt, evaluation-prompt, embedding-cache and image tables a run reads (opened and checked before
    any network loads, so a wrong path or a stale cache fails fast)."""

    prompts: PromptTable | None
    eval_prompts: PromptTable | None
    cache: EmbeddingCache | None
    images: Any


def open_tables(
    config: ml_collections.ConfigDict, preset_name: str, built_in: BuiltInSources | None
) -> Tables:
    t = config.teacher
    prompts = training_prompts(config) if built_in is None or t.prompts else None
    eval_prompts = open_prompts(t.eval_prompts, t.prompt_field) if t.eval_prompts else prompts
    cache = EmbeddingCache(t.embedding_cache) if t.embedding_cache else None
    if cache is not None:
        if prompts is None:
            raise ValueError(
                "teacher.embedding_cache needs the prompt table it was made from (teacher.prompts)"
            )
        cache.verify(preset=preset_name, prompts=prompts)
    images = open_teacher_images(t) if t.data else None
    return Tables(prompts, eval_prompts, cache, images)


def build(
    config: ml_collections.ConfigDict, shardings_for=None, built_in: BuiltInSources | None = None
) -> World:
    """The world of ``config.teacher``; with ``built_in``, prompt and image tables are used only where
    ``teacher.prompts`` / ``teacher.data`` name one."""
    t = config.teacher
    preset = get_preset(t.preset)
    encoders = tuple(name for name, _ in preset.encoders)
    tables = open_tables(config, preset.name, built_in)
    pipe = _load(config, ("unet", "vae", *encoders), shardings_for)

    unet, vae = pipe.components["unet"], pipe.components["vae"]
    teacher = NetworkDenoiser(unet.net, pipe.prediction, _schedule(pipe.scheduler_config))
    resolution = t.resolution or preset.resolution
    sample_shape = _sample_shape(resolution, vae.config, unet.config)
    encoder = _prompt_encoder(preset, pipe, resolution)
    nets = {"teacher": unet.net, "vae": vae.net, **{n: pipe.components[n].net for n in encoders}}
    frozen = {"teacher": unet.params, "vae": vae.params, **{n: pipe.components[n].params for n in encoders}}
    return assemble(
        config,
        tables,
        encoder,
        teacher,
        nets,
        frozen,
        sample_shape,
        resolution,
        pipe.path,
        t.uncond or preset.uncond,
        built_in,
    )


def assemble(
    config: ml_collections.ConfigDict,
    tables: Tables,
    encoder,
    teacher,
    nets: dict[str, Net],
    frozen: dict,
    sample_shape: tuple[int, ...],
    resolution: int,
    source: str,
    uncond_rule: str,
    built_in: BuiltInSources | None = None,
) -> World:
    """A text-to-image world from its loaded networks (``nets``/``frozen`` with "teacher" and "vae"), prompt
    encoder and tables: the unconditional input, condition and image sources, sampling output and metrics.
    Shared by the UNet (``build``) and flow-transformer (``teachers.flow_world``) worlds.

    ``encoder`` None: no text encoder is loaded, every conditioning comes from ``tables.cache`` (the empty
    prompt from its probe, evaluation batches from its first rows, image captions from its cached captions);
    the caller checks the cache."""
    vae_net = nets["vae"]
    prepare = _prepare_fn(encoder, vae_net)
    if encoder is None:
        if tables.cache is None or (tables.images is not None and tables.cache.captions is None):
            raise ValueError("a world without text encoders takes every conditioning from an embedding cache")
        empty = {k: jnp.asarray(v, jnp.float32) for k, v in tables.cache.probe.items()}
    else:
        empty = jax.jit(encoder.encode)(frozen, encoder.tokenize([""]))
    if uncond_rule == "zeros":  # SDXL recipes: zero prompt and pooled embeddings, same micro-conditioning
        uncond = {k: (v if k == "time_ids" else jnp.zeros_like(v)) for k, v in empty.items()}
    else:
        uncond = empty
    uncond = jax.tree.map(np.asarray, uncond)
    prompts, eval_prompts = tables.prompts, tables.eval_prompts

    def eval_batch(n: int) -> dict[str, np.ndarray]:
        if encoder is None:
            return tables.cache.rows([i % tables.cache.count for i in range(n)])
        if eval_prompts is None:
            return built_in.eval_batch(encoder.tokenize, n)
        return encoder.tokenize(eval_prompts.take([i % len(eval_prompts) for i in range(n)]))

    def eval_texts(n: int) -> list[str] | None:
        if encoder is None:  # the cache's rows are the prompt table's, in order (verified when opened)
            return tables.prompts.take([i % tables.cache.count for i in range(n)])
        if eval_prompts is None:
            return built_in.eval_prompts(n) if built_in.eval_prompts else None
        return eval_prompts.take([i % len(eval_prompts) for i in range(n)])

    if tables.cache is not None:
        if encoder is not None:
            tables.cache.verify(probe=jax.tree.map(np.asarray, empty), source=source)
        conditions = tables.cache.source(seed=config.seed)
    elif prompts is None:
        conditions = built_in.conditions(encoder.tokenize)
    else:
        conditions = PromptSource(prompts, encoder.tokenize, seed=config.seed)
    data = None
    if tables.images is not None and encoder is None:  # the captions' conditioning from the cache
        data = ImageTextSource(tables.images, None, resolution, config.seed, tables.cache.caption_rows)
    elif tables.images is not None:
        data = ImageTextSource(tables.images, encoder.tokenize, resolution, seed=config.seed)
    elif built_in is not None:
        data = built_in.data(encoder.tokenize)

    decode = jax.jit(lambda p, z: vae_net.apply(p, z, method="images_from_latents"))

    def decode_images(samples: np.ndarray, chunk: int = 8) -> np.ndarray:
        return np.concatenate(
            [np.asarray(decode(frozen["vae"], samples[i : i + chunk])) for i in range(0, len(samples), chunk)]
        )

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
        conditions=conditions,
        data=data,
        num_classes=0,
        eval_batch=eval_batch,
        evaluate=evaluate,
        prepare=prepare,
        decode=decode_images,
        source=source,
        eval_prompts=eval_texts,
    )


def build_abstract(config: ml_collections.ConfigDict) -> World:
    """The world's shapes, for plans (``tools/plan.py``): every network built from its configuration, frozen
    parameters as ``jax.ShapeDtypeStruct``; no weights, tokenizers, prompts or images are read.

    Configurations come from ``teacher.path`` when it is a local pipeline or converted directory, else from
    the preset's stored ones (``jdistill/teachers/configs``). Batches are zeros of the real batches' shapes
    and dtypes (token ids, cached embeddings, images), ``uncond`` zeros of the conditioning's shapes.
    Sampling and evaluation are not available.
    """
    from jdistill.teachers.abstract import abstract_nets, check_settings, shapes_world, stored_configs

    t = config.teacher
    preset = get_preset(t.preset)
    check_settings(t, UNCOND_RULES)
    encoders = tuple(name for name, _ in preset.encoders)
    configs, scheduler = stored_configs(t, preset, ("unet", "vae", *encoders))
    built = abstract_nets(t, configs)
    nets = {"teacher": built["unet"], "vae": built["vae"], **{n: built[n] for n in encoders}}
    resolution = t.resolution or preset.resolution
    time_ids = (resolution, resolution, 0, 0, resolution, resolution) if preset.pooled_from else None
    encoder = PromptEncoder(
        tuple((name, nets[name], layer) for name, layer in preset.encoders), {}, preset.pooled_from, time_ids
    )
    teacher = NetworkDenoiser(
        nets["teacher"], prediction_type(scheduler, t.path or preset.name), _schedule(scheduler)
    )
    return shapes_world(
        config,
        teacher=teacher,
        nets=nets,
        encoder=encoder,
        token_lengths={name: configs[name].get("max_position_embeddings", 77) for name in encoders},
        shape=_sample_shape(resolution, configs["vae"], configs["unet"]),
        resolution=resolution,
        cache_drops_encoders=False,
    )
