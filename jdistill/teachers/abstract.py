"""What the abstract worlds (``build_world(config, abstract=True)``, for ``tools/plan.py``) of the UNet and flow
teachers share: the settings a real world refuses, the components' configurations (a local pipeline's or the
preset's stored ones), their networks without parameters, and a world of zero batches of the real shapes."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from jdistill.convert.io import read_json
from jdistill.convert.pipeline import component_net
from jdistill.data.embeddings import COND
from jdistill.data.sources import SyntheticSource
from jdistill.models.attention import ATTENTION_IMPLS
from jdistill.models.layers import DTYPES, Precision
from jdistill.models.net import Net
from jdistill.teachers.base import World
from jdistill.teachers.prompts import IDS

CLIP_LENGTH = 77  # CLIP tokenizers' model_max_length (the text encoders' max_position_embeddings)


def check_settings(t: ml_collections.ConfigDict, uncond_rules: tuple[str, ...] = ("empty_prompt",)) -> None:
    """The teacher settings a world refuses (real worlds in ``diffusers_world.load_components``, and the
    abstract ones)."""
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
    cache_drops_encoders: bool = True,
) -> World:
    """A text-to-image world of shapes: ``nets`` (with "teacher" and "vae") as abstract frozen parameters,
    ``encoder`` (a ``PromptEncoder`` or ``FlowPromptEncoder``) turning ``token_lengths`` ids into the
    conditioning, zero batches of the real sources' shapes, and no sampling or evaluation. With
    ``teacher.embedding_cache`` prompt batches are the cached conditioning; ``cache_drops_encoders``: the world
    then holds no text encoder (the flow world; the UNet world keeps its encoders), and its image batches are
    images plus the cached captions' conditioning (a cache written with ``teacher.data``)."""
    from jdistill.teachers.diffusers_world import _prepare_fn

    frozen = {name: net.abstract for name, net in nets.items()}

    def token_ids(n: int) -> dict[str, np.ndarray]:
        return {IDS + name: np.zeros((n, length), np.int32) for name, length in token_lengths.items()}

    cond_shapes = jax.eval_shape(encoder.encode, frozen, token_ids(1))
    uncond = {k: np.zeros(v.shape, v.dtype) for k, v in cond_shapes.items()}
    cached = bool(config.teacher.embedding_cache)
    dropped = cached and cache_drops_encoders
    if dropped:  # the text encoders stay out of the run: captions' conditioning comes from the cache, too
        nets = {name: net for name, net in nets.items() if name not in token_lengths}
        frozen = {name: frozen[name] for name in nets}
    if cached:

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
        captions = conditions(rng, n) if dropped else token_ids(n)
        return {"images": np.zeros((n, resolution, resolution, 3), np.uint8), **captions}

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
        data=SyntheticSource(images),
        num_classes=0,
        eval_batch=unavailable,
        evaluate=unavailable,
        prepare=_prepare_fn(encoder, nets["vae"]),
        decode=unavailable,
        source=None,
    )
