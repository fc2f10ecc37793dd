"""The settings every recipe shares; recipe files in configs/ start from ``base_config()``."""

from __future__ import annotations

import ml_collections


def gmm_teacher(schedule: str = "vp") -> ml_collections.ConfigDict:
    """The analytic Gaussian-mixture teacher on a VP (Stable Diffusion betas) or rectified-flow path."""
    return ml_collections.ConfigDict(
        {
            "kind": "gmm",
            "schedule": schedule_config(schedule),
            "gmm": {"num_modes": 8, "radius": 2.0, "std": 0.1, "num_classes": 2},
        }
    )


def schedule_config(kind: str = "vp") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "kind": kind,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "num_train_timesteps": 1000,
            "shift": 1.0,
            "sigma_data": 0.5,
        }
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000
    c.batch_size = 256  # global, over all devices and processes
    c.log_every = 100
    c.progress_bar = True
    c.max_nonfinite_streak = 20  # consecutive skipped (non-finite) updates before the run stops

    c.teacher = gmm_teacher()
    c.method = ml_collections.ConfigDict()  # set by the recipe: name + the method's own settings
    c.networks = ml_collections.ConfigDict()  # one section per trained network

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "num_devices": -1})
    c.sharding = ml_collections.ConfigDict(
        {
            # logical axis name -> mesh axis (or None: replicate)
            "rules": (("embed", None), ("mlp", "fsdp"), ("heads", "fsdp"), ("vocab", "fsdp")),
            "unannotated": "replicate",  # or "fsdp": shard the largest divisible dim of big unannotated params
        }
    )
    c.distributed = ml_collections.ConfigDict(
        {
            "auto": True,
            "coordinator_address": "",
            "num_processes": 0,
            "process_id": -1,
            "initialization_timeout": 300,
        }
    )
    c.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 3, "async_save": True})
    c.sample = ml_collections.ConfigDict(
        {"every": 0, "count": 1024, "final_count": 4096, "batch": 1024, "use_ema": True, "seed": 1234}
    )
    return c


def gmm_distillation(
    c: ml_collections.ConfigDict, *, student_lr: float = 3e-4, fake_lr: float = 2e-3
) -> None:
    """The Gaussian-mixture setting the distribution-matching presets share (measured on swiftbrush, see
    configs/swiftbrush.py): the VP teacher, 8000 steps of 256, a one-step x0 MLP student with Fourier
    features, EMA and a cosine schedule, and a v-prediction MLP fake score trained from scratch."""
    from jdistill.methods.common import network_config

    c.teacher = gmm_teacher("vp")
    c.num_steps = 8000
    c.batch_size = 256
    c.log_every = 200
    c.checkpoint.every = 2000
    c.sample.every = 2000
    c.networks.student = network_config(prediction="x0", lr=student_lr, ema_decay=0.99, fourier_features=2)
    c.networks.student.optimizer.schedule = "cosine"
    c.networks.fake_score = network_config(prediction="v", lr=fake_lr, fourier_features=4)
    c.networks.fake_score.optimizer.schedule = "cosine"
    c.method.fake_target = "v"
