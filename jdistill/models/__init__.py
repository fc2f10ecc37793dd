"""Flax models, built from a network's ``model`` config section."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
from flax import nnx

from jdistill.models.layers import DTYPES
from jdistill.models.mlp import TimeMLP
from jdistill.models.net import Net

ARCHITECTURES = ("mlp", "teacher")
NETWORK_INITS = ("random", "teacher")


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
            "time_cond_proj_dim": 0,  # > 0: takes cond["timestep_cond"] (LCM's guidance embedding)
            "second_time": False,  # takes cond["time_delta"] (MeanFlow's t - r)
        }
    )
    cfg.update(overrides)
    return cfg


def teacher_model_config(init: str = "teacher", time_cond_proj_dim: int = 0) -> ml_collections.ConfigDict:
    """A network with the teacher's architecture, initialised from the teacher's weights or at random.

    ``time_cond_proj_dim`` > 0 (UNet teachers): plus LCM's guidance embedding, diffusers' ``time_cond_proj_dim``
    (the UNet then takes cond["timestep_cond"]); from the teacher, its new projection starts at random.
    Its parameters are float32 master weights whatever the teacher's storage; it computes in
    ``compute_dtype`` and rematerialises per ``remat`` (empty: the teacher's settings).
    """
    return ml_collections.ConfigDict(
        {
            "arch": "teacher",
            "init": init,
            "time_cond_proj_dim": time_cond_proj_dim,
            "compute_dtype": "",
            "remat": "",
        }
    )


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
            time_cond_proj_dim=cfg.get("time_cond_proj_dim", 0),
            second_time=cfg.get("second_time", False),
            out_dim=cfg.out_dim or None,
            rngs=rngs,
        )
    if cfg.arch == "teacher":
        if "teacher" not in world.nets:
            raise ValueError("model arch 'teacher' needs a network teacher (this teacher is analytic)")
        if zero_out:
            raise ValueError(
                "a zero-initialised residual on a network teacher is not supported; use a LoRA or a copy"
            )
        base = world.nets["teacher"]
        extra = cfg.get("time_cond_proj_dim", 0)
        if extra and not hasattr(base.config, "time_cond_proj_dim"):
            kind = type(base.config).__name__ if base.config is not None else "a network without a config"
            raise ValueError(
                f"model.time_cond_proj_dim={extra} (a guidance embedding) needs a UNet teacher; this teacher's "
                f"network is {kind}"
            )
        if base.remake is None:
            if cfg.get("compute_dtype") or cfg.get("remat"):
                raise ValueError(
                    "model.compute_dtype / model.remat need a teacher network that can be rebuilt"
                )
            return base.make
        options = {
            "param_dtype": jnp.float32,
            "dtype": DTYPES[cfg.compute_dtype] if cfg.get("compute_dtype") else None,
        }
        if cfg.get("remat"):
            options["remat_policy"] = cfg.remat
        if not extra:
            return base.remake(base.config, **options)
        own = base.config.time_cond_proj_dim
        if own not in (None, extra):
            raise ValueError(
                f"model.time_cond_proj_dim={extra}, but the teacher's UNet already has time_cond_proj_dim={own}"
            )
        return base.remake(dataclasses.replace(base.config, time_cond_proj_dim=extra), **options)
    raise ValueError(f"unknown model arch {cfg.arch!r}; choose one of {ARCHITECTURES}")


__all__ = ["ARCHITECTURES", "NETWORK_INITS", "Net", "build_model", "mlp_config", "teacher_model_config"]
