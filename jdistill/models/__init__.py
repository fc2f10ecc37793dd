"""Flax models, built from a network's ``model`` config section."""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections
from flax import nnx

from jdistill.models.mlp import TimeMLP
from jdistill.models.net import Net

ARCHITECTURES = ("mlp",)


def mlp_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        {
            "arch": "mlp",
            "width": 128,
            "depth": 3,
            "hidden": 256,
            "time_embed_dim": 64,
            "time_scale": 1.0,
            "out_dim": 0,  # 0: the data dimension; 1: a discriminator logit
            "fourier_features": 0,
        }
    )
    cfg.update(overrides)
    return cfg


def build_model(
    cfg: ml_collections.ConfigDict, world, *, zero_out: bool = False
) -> Callable[[nnx.Rngs], nnx.Module]:
    """A constructor ``rngs -> module`` for ``cfg.arch``; shapes that depend on the teacher come from ``world``."""
    if cfg.arch == "mlp":
        if len(world.sample_shape) != 1:
            raise ValueError(
                f"the mlp architecture needs flat samples, but this teacher's are {world.sample_shape}"
            )
        data_dim = math.prod(world.sample_shape)
        return lambda rngs: TimeMLP(
            data_dim,
            world.num_classes,
            width=cfg.width,
            depth=cfg.depth,
            hidden=cfg.hidden,
            time_embed_dim=cfg.time_embed_dim,
            time_scale=cfg.time_scale,
            zero_out=zero_out,
            fourier_features=cfg.fourier_features,
            out_dim=cfg.out_dim or None,
            rngs=rngs,
        )
    raise ValueError(f"unknown model arch {cfg.arch!r}; choose one of {ARCHITECTURES}")


__all__ = ["ARCHITECTURES", "Net", "build_model", "mlp_config"]
