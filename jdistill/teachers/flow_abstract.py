"""The abstract world of a flow-matching transformer teacher (FLUX.1, SD3 / SD3.5): shapes only, for plans.

``build_abstract(config)`` is what ``teachers.build_world(config, abstract=True)`` gives for
``teacher.kind = "flow"`` (``tools/plan.py``): the world ``teachers.flow_world.build`` would give, with every
network built from its configuration and the frozen parameters as ``jax.ShapeDtypeStruct``; no weights,
tokenizers, prompts or images are read.

- Configurations: from ``teacher.path`` when it is a local pipeline or converted directory
  (``model_index.json``), else the preset's stored ones (``jdistill/teachers/configs/<preset>``).
- The teacher: the transformer as ``FlowTransformerDenoiser`` on the teacher pipeline's sampling steps
  (``flow_world.pipeline_schedule``: static shift, or FLUX-dev's mu at the resolution), as the real world.
- Conditioning: ``FlowPromptEncoder`` of the preset's CLIP and T5 encoders, its shapes from
  ``jax.eval_shape`` (FLUX: T5's ``t5_length`` x 4096 states and CLIP-L's pooled 768; SD3 / SD3.5: 77 CLIP +
  256 T5 tokens x 4096, pooled 2048). ``uncond``: zeros of one row of those shapes.
- Batches: zeros of the real sources' shapes and dtypes. Prompt batches are token ids (CLIP: the encoder's
  ``max_position_embeddings``; T5: ``teacher.t5_length`` or the preset's); image batches (``World.data``) are
  uint8 images at the resolution plus their captions' token ids, as ``ImageTextSource`` gives them.
- With ``teacher.embedding_cache`` set, as the real world: prompt batches are the cached conditioning
  ``cond.<key>``, image batches the images plus their captions' cached conditioning, and no text encoder is
  held.

Sampling, evaluation, saving and decoding are not available.
"""

from __future__ import annotations

import ml_collections

from jdistill.diffusion.transformer_denoiser import FlowTransformerDenoiser
from jdistill.teachers.abstract import (
    CLIP_LENGTH,
    abstract_nets,
    check_settings,
    shapes_world,
    stored_configs,
)
from jdistill.teachers.base import World
from jdistill.teachers.flow_world import pipeline_schedule, sample_shape, t5_length
from jdistill.teachers.presets import FlowTeacherPreset, get_preset
from jdistill.teachers.prompts import FlowPromptEncoder


def build_abstract(config: ml_collections.ConfigDict) -> World:
    """The flow teacher's world as shapes (module docstring)."""
    t = config.teacher
    preset: FlowTeacherPreset = get_preset(t.preset, FlowTeacherPreset)
    check_settings(t)
    configs, scheduler = stored_configs(t, preset, ("transformer", "vae", *preset.encoders))
    built = abstract_nets(t, configs)
    nets = {"teacher": built["transformer"], "vae": built["vae"], **{n: built[n] for n in preset.encoders}}
    resolution = t.resolution or preset.resolution
    shape = sample_shape(resolution, preset.family, configs["vae"], configs["transformer"])
    length = t5_length(config, preset)
    encoder = FlowPromptEncoder(
        preset.family, tuple((n, nets[n]) for n in preset.clips), (preset.t5, nets[preset.t5]), {}, length
    )
    lengths = {n: configs[n].get("max_position_embeddings", CLIP_LENGTH) for n in preset.clips}
    lengths[preset.t5] = length
    teacher = FlowTransformerDenoiser(
        nets["teacher"], pipeline_schedule(scheduler, preset.family, shape), preset.family
    )
    return shapes_world(
        config,
        teacher=teacher,
        nets=nets,
        encoder=encoder,
        token_lengths=lengths,
        shape=shape,
        resolution=resolution,
    )
