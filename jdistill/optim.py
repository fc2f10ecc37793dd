"""Optimizers from config: Adam/AdamW with clipping, warm-up and an optional decay schedule."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")


def optimizer_config(lr: float = 1e-4, **overrides) -> ml_collections.ConfigDict:
    """The optimizer section of a network's config, with every key the builder reads."""
    cfg = ml_collections.ConfigDict(
        {
            "name": "adam",
            "lr": lr,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "grad_clip": 0.0,  # global-norm clip; 0 disables
            "warmup_steps": 0,
            "schedule": "constant",
        }
    )
    cfg.update(overrides)
    return cfg


def learning_rate(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else None
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r}; choose one of {LR_SCHEDULES}")
    return optax.join_schedules([warmup, main], [cfg.warmup_steps]) if warmup else main


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation for one network. ``total_steps`` counts this network's own updates."""
    lr = learning_rate(cfg, total_steps)
    if cfg.name == "adam":
        opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        if cfg.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    elif cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {OPTIMIZERS}")
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt) if cfg.grad_clip else opt
