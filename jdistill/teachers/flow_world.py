"""The world of a flow-matching transformer teacher (FLUX.1-dev / schnell / lite, SD3, SD3.5).

``teacher.kind = "flow"`` with a flow preset (``teachers/presets.py``): the transformer is the teacher
(``FlowTransformerDenoiser``: velocity on the rectified-flow path, FLUX's guidance embedding or SD3's true
CFG), prompts go through CLIP and T5 as the pipelines' ``encode_prompt`` does (``FlowPromptEncoder``), samples
are the 16-channel VAE's latents (shift and scale applied by the VAE). Tables, sources, sampling output and
metrics are the UNet world's (``diffusers_world.assemble``).

The schedule's static ``shift`` is the scheduler config's (SD3: 3, FLUX-schnell: 1); FLUX-dev's sampling
shift depends on the resolution (``samplers.flux_sigmas`` with ``flux_mu`` of the token count).
"""

from __future__ import annotations

import ml_collections

from jdistill.diffusion.schedules import FlowSchedule
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


def build(config: ml_collections.ConfigDict, shardings_for=None) -> World:
    t = config.teacher
    preset = get_preset(t.preset, FlowTeacherPreset)
    tables = diffusers_world.open_tables(config, preset.name, None)
    components = ("transformer", "vae", *preset.encoders)
    pipe = diffusers_world.load_components(config, preset, components, shardings_for, ("empty_prompt",))
    transformer, vae = pipe.components["transformer"], pipe.components["vae"]
    shift = float(pipe.scheduler_config.get("shift", 1.0))
    teacher = FlowTransformerDenoiser(transformer.net, FlowSchedule(shift=shift), preset.family)
    resolution = t.resolution or preset.resolution
    shape = sample_shape(resolution, preset.family, vae.config, transformer.config)
    encoder = FlowPromptEncoder(
        preset.family,
        tuple((n, pipe.components[n].net) for n in preset.clips),
        (preset.t5, pipe.components[preset.t5].net),
        pipe.tokenizers,
        preset.t5_length,
    )
    nets = {
        "teacher": transformer.net,
        "vae": vae.net,
        **{n: pipe.components[n].net for n in preset.encoders},
    }
    frozen = {
        "teacher": transformer.params,
        "vae": vae.params,
        **{n: pipe.components[n].params for n in preset.encoders},
    }
    return diffusers_world.assemble(
        config, tables, encoder, teacher, nets, frozen, shape, resolution, pipe.path, "empty_prompt"
    )
