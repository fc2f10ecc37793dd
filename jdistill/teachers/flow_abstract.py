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
  ``cond.<key>``, no text encoder is held, and there is no image source (captions would need the encoders).

Sampling, evaluation, saving and decoding are not available.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from jdistill.convert.io import read_json
from jdistill.convert.pipeline import component_net
from jdistill.data.embeddings import COND
from jdistill.data.sources import SyntheticSource
from jdistill.diffusion.transformer_denoiser import FlowTransformerDenoiser
from jdistill.models.attention import ATTENTION_IMPLS
from jdistill.models.layers import DTYPES, Precision
from jdistill.models.net import Net
from jdistill.teachers.base import World
from jdistill.teachers.diffusers_world import _prepare_fn
from jdistill.teachers.flow_world import pipeline_schedule, sample_shape, t5_length
from jdistill.teachers.presets import FlowTeacherPreset, get_preset
from jdistill.teachers.prompts import IDS, FlowPromptEncoder

CLIP_LENGTH = 77  # CLIP tokenizers' model_max_length (the text encoders' max_position_embeddings)


def check_settings(t: ml_collections.ConfigDict, uncond_rules: tuple[str, ...] = ("empty_prompt",)) -> None:
    """The teacher settings a real world refuses (``diffusers_world.load_components``), refused here too."""
    checks = (
        ("dtype", DTYPES),
        ("param_dtype", DTYPES),
        ("uncond", ("", *uncond_rules)),
        ("attention_impl", ATTENTION_IMPLS),
    )
    for key, allowed in checks:
        if t[key] not in allowed:
            raise ValueError(f"teacher.{key}={t[key]!r}; choose one of {list(allowed)}")


def stored_configs(t: ml_collections.ConfigDict, preset, components: tuple[str, ...]) -> tuple[dict, dict]:
    """({component: config}, scheduler config) of ``components``: from ``t.path`` when it is a local pipeline
    or converted directory, else the preset's stored configurations."""
    local = t.path if t.path and os.path.isfile(os.path.join(t.path, "model_index.json")) else ""
    if local:
        configs = {c: read_json(os.path.join(local, c, "config.json")) for c in components}
        return configs, read_json(os.path.join(local, "scheduler", "scheduler_config.json"))
    return {c: preset.component_config(c) for c in components}, preset.scheduler_config


def abstract_nets(t: ml_collections.ConfigDict, configs: dict[str, dict]) -> dict[str, Net]:
    """Each component's network at the teacher's precision, attention and remat settings (none allocated)."""
    precision = Precision(dtype=DTYPES[t.dtype], param_dtype=DTYPES[t.param_dtype])
    return {
        name: component_net(name, cfg, precision=precision, attention_impl=t.attention_impl, remat=t.remat)
        for name, cfg in configs.items()
    }


def shapes_world(
    config: ml_collections.ConfigDict,
    *,
    teacher,
    nets: dict[str, Net],
    encoder,
    token_lengths: dict[str, int],
    shape: tuple[int, ...],
    resolution: int,
) -> World:
    """A text-to-image world of shapes: ``nets`` (with "teacher" and "vae") as abstract frozen parameters,
    ``encoder`` (a ``PromptEncoder`` or ``FlowPromptEncoder``) turning ``token_lengths`` ids into the
    conditioning, zero batches of the real sources' shapes, and no sampling or evaluation. With
    ``teacher.embedding_cache`` the world holds no text encoder and no image source, as the real one."""
    frozen = {name: net.abstract for name, net in nets.items()}

    def token_ids(n: int) -> dict[str, np.ndarray]:
        return {IDS + name: np.zeros((n, length), np.int32) for name, length in token_lengths.items()}

    cond_shapes = jax.eval_shape(encoder.encode, frozen, token_ids(1))
    uncond = {k: np.zeros(v.shape, v.dtype) for k, v in cond_shapes.items()}
    cached = bool(config.teacher.embedding_cache)
    if cached:  # the text encoders stay out of the run (captioned images would need them: no data source)
        nets = {name: net for name, net in nets.items() if name not in token_lengths}
        frozen = {name: frozen[name] for name in nets}

        def conditions(rng, n):
            return {
                COND + k: np.zeros((n, *v.shape[1:]), np.float32)
                for k, v in cond_shapes.items()
                if k != "time_ids"
            }
    else:

        def conditions(rng, n):
            return token_ids(n)

    def images(rng, n):
        return {"images": np.zeros((n, resolution, resolution, 3), np.uint8), **token_ids(n)}

    def unavailable(*args, **kwargs):
        raise RuntimeError("an abstract world (shapes only) cannot sample, evaluate or save")

    return World(
        teacher=teacher,
        frozen=frozen,
        frozen_axes={name: net.logical_axes for name, net in nets.items()},
        nets=nets,
        sample_shape=shape,
        uncond=uncond,
        conditions=SyntheticSource(conditions),
        data=None if cached else SyntheticSource(images),
        num_classes=0,
        eval_batch=unavailable,
        evaluate=unavailable,
        save_samples=unavailable,
        prepare=_prepare_fn(encoder, nets["vae"]),
        decode=unavailable,
        source=None,
    )


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
