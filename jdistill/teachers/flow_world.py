"""The world of a flow-matching transformer teacher (FLUX.1-dev / schnell / lite, SD3, SD3.5).

``teacher.kind = "flow"`` with a flow preset (``teachers/presets.py``): the transformer is the teacher
(``FlowTransformerDenoiser``: velocity on the rectified-flow path, FLUX's guidance embedding or SD3's true
CFG), prompts go through CLIP and T5 as the pipelines' ``encode_prompt`` does (``FlowPromptEncoder``), samples
are the 16-channel VAE's latents (shift and scale applied by the VAE). Tables, sources, sampling output and
metrics are the UNet world's (``diffusers_world.assemble``).

With ``teacher.embedding_cache`` (written by ``tools/cache_embeddings.py``), no text encoder is loaded (T5-XXL
alone is 4.7B parameters): conditioning comes from the cache, the unconditional input from its empty-prompt
probe, evaluation batches from its first prompts. The cache's manifest must name this run's preset, prompts,
encoder components and T5 length, and its widths must be the transformer's; as no encoder runs, the encoders'
weights themselves are not compared (the UNet world compares their empty-prompt output with the cache's).
Captioned images (``teacher.data``) need the cache to hold their captions (the tool run with ``teacher.data``:
the same captions in the same order, by SHA-256): image batches are then the images plus the cached caption
conditioning ``cond.<key>``. Other evaluation prompts than the cached ones need the encoders and are refused.

The teacher's sampler places its steps as the pipeline does (``pipeline_schedule``): the scheduler config's
static ``shift`` (SD3: 3, FLUX-schnell: 1), or FLUX-dev's resolution-dependent shift (``flux_mu`` of the token
count), on FluxPipeline's sigma grid for FLUX.
"""

from __future__ import annotations

import ml_collections

from jdistill.data.embeddings import EmbeddingCache
from jdistill.data.images import CaptionTable, ImageTextTable
from jdistill.data.text import PromptTable, prompt_digest
from jdistill.diffusion.schedules import FlowSchedule, flux_mu
from jdistill.diffusion.transformer_denoiser import FlowTransformerDenoiser
from jdistill.teachers import diffusers_world
from jdistill.teachers.base import World
from jdistill.teachers.presets import FlowTeacherPreset, get_preset
from jdistill.teachers.prompts import FlowPromptEncoder


def flow_teacher_config(preset: str = "flux_lite") -> ml_collections.ConfigDict:
    """The ``teacher`` section for a flow-matching transformer teacher (the UNet section's keys)."""
    c = diffusers_world.diffusers_teacher_config(preset)
    c.kind = "flow"
    return c


def sample_shape(
    resolution: int, family: str, vae_config: dict, transformer_config: dict
) -> tuple[int, int, int]:
    """(H, W, C) of the VAE latents; FLUX packs 2x2 latent patches into its ``in_channels`` (so the latent side
    must be even), SD3 patchifies inside the transformer."""
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    factor = vae_factor * (2 if family == "flux" else 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of {factor} (VAE factor and packing)")
    channels = vae_config["latent_channels"]
    want = channels * 4 if family == "flux" else channels
    if transformer_config["in_channels"] != want:
        raise ValueError(
            f"the transformer takes {transformer_config['in_channels']} input channels; the VAE's "
            f"{channels}-channel latents give {want}"
        )
    return (resolution // vae_factor, resolution // vae_factor, channels)


def t5_length(config: ml_collections.ConfigDict, preset: FlowTeacherPreset) -> int:
    """T5 tokens per prompt: ``teacher.t5_length`` or the preset's (the pipelines' max_sequence_length)."""
    n = int(config.teacher.get("t5_length", 0) or preset.t5_length)
    if n <= 0:
        raise ValueError(f"teacher.t5_length={n}; T5 needs at least one token")
    return n


def prompt_encoder(
    config: ml_collections.ConfigDict, preset: FlowTeacherPreset, pipe
) -> tuple[FlowPromptEncoder, dict]:
    """The pipeline's prompt encoder and its encoders' parameters."""
    encoder = FlowPromptEncoder(
        preset.family,
        tuple((n, pipe.components[n].net) for n in preset.clips),
        (preset.t5, pipe.components[preset.t5].net),
        pipe.tokenizers,
        t5_length(config, preset),
    )
    return encoder, {n: pipe.components[n].params for n in preset.encoders}


def load_prompt_encoder(config: ml_collections.ConfigDict) -> tuple[FlowPromptEncoder, dict, str]:
    """The teacher's prompt encoder with only the text encoders (CLIP and T5) loaded: (encoder, their params,
    source); for ``tools/cache_embeddings.py``."""
    preset = get_preset(config.teacher.preset, FlowTeacherPreset)
    pipe = diffusers_world.load_components(config, preset, preset.encoders, None, ("empty_prompt",))
    encoder, params = prompt_encoder(config, preset, pipe)
    return encoder, params, pipe.path


def cache_encoders(config: ml_collections.ConfigDict, preset: FlowTeacherPreset) -> dict:
    """What a run on an embedding cache compares with the manifest's ``encoders`` (``FlowPromptEncoder.describe``)."""
    return {
        "clips": list(preset.clips),
        "t5": preset.t5,
        "t5_length": t5_length(config, preset),
    }


def check_cache(
    config: ml_collections.ConfigDict,
    preset: FlowTeacherPreset,
    cache: EmbeddingCache,
    eval_prompts: PromptTable | None,
    images: ImageTextTable | None = None,
) -> None:
    """Before any network loads: the cache's encoders are this run's, it holds the captions of ``images``
    (``teacher.data``), and nothing else needs an encoder."""
    captions = CaptionTable(images) if images is not None else None
    cache.verify(encoders=cache_encoders(config, preset), captions=captions)
    t = config.teacher
    if t.eval_prompts and prompt_digest(eval_prompts) != cache.manifest["prompts"]["sha256"]:
        raise ValueError(
            "teacher.embedding_cache: a flow teacher on an embedding cache loads no text encoder, so evaluation "
            f"prompts come from the cache; teacher.eval_prompts={t.eval_prompts!r} holds other prompts than the "
            "cached ones: leave it empty (the first training prompts)"
        )


def pipeline_schedule(scheduler: dict, family: str, shape: tuple[int, int, int]) -> FlowSchedule:
    """The flow path with the sampling steps of the teacher's pipeline at latent ``shape``: the scheduler's
    static shift, or (``use_dynamic_shifting``, FLUX-dev/lite) the mu of the token count (2x2 patches in both
    families), on FluxPipeline's or the scheduler's own sigma grid."""
    mu = None
    if scheduler.get("use_dynamic_shifting"):
        tokens = (shape[0] // 2) * (shape[1] // 2)
        mu = flux_mu(
            tokens,
            scheduler.get("base_image_seq_len", 256),
            scheduler.get("max_image_seq_len", 4096),
            scheduler.get("base_shift", 0.5),
            scheduler.get("max_shift", 1.15),
        )
    return FlowSchedule(
        shift=float(scheduler.get("shift", 1.0)),
        mu=mu,
        sigma_grid="flux" if family == "flux" else "scheduler",
    )


def build(config: ml_collections.ConfigDict, shardings_for=None) -> World:
    t = config.teacher
    preset = get_preset(t.preset, FlowTeacherPreset)
    built_in = classifier = None
    if preset.name == "digits_flux":  # the miniature flow world: built-in captions and images, digit metrics
        from jdistill.teachers import digits_world

        classifier = digits_world.load_world_classifier(config)  # before the networks: fails fast
        built_in = digits_world.built_in_sources(config.seed)
    tables = diffusers_world.open_tables(config, preset.name, built_in)
    cached = tables.cache is not None
    if cached:
        check_cache(config, preset, tables.cache, tables.eval_prompts, tables.images)
    encoders = () if cached else preset.encoders  # on a cache: no CLIP, no T5
    components = ("transformer", "vae", *encoders)
    pipe = diffusers_world.load_components(config, preset, components, shardings_for, ("empty_prompt",))
    transformer, vae = pipe.components["transformer"], pipe.components["vae"]
    resolution = t.resolution or preset.resolution
    shape = sample_shape(resolution, preset.family, vae.config, transformer.config)
    schedule = pipeline_schedule(pipe.scheduler_config, preset.family, shape)
    teacher = FlowTransformerDenoiser(transformer.net, schedule, preset.family)
    if cached:
        widths = {
            "encoder_hidden_states": transformer.config["joint_attention_dim"],
            "pooled_projections": transformer.config["pooled_projection_dim"],
        }
        tables.cache.verify(widths=widths)
        encoder, encoder_params = None, {}
    else:
        encoder, encoder_params = prompt_encoder(config, preset, pipe)
    nets = {
        "teacher": transformer.net,
        "vae": vae.net,
        **{n: pipe.components[n].net for n in encoders},
    }
    frozen = {"teacher": transformer.params, "vae": vae.params, **encoder_params}
    world = diffusers_world.assemble(
        config, tables, encoder, teacher, nets, frozen, shape, resolution, pipe.path, "empty_prompt", built_in
    )
    if built_in is None:
        return world
    from jdistill.teachers.digits_world import with_digits

    return with_digits(world, classifier)
