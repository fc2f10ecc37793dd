"""The Gaussian-mixture world: analytic teacher, synthetic data, mode statistics."""

from __future__ import annotations

import ml_collections
import numpy as np

from jdistill.data.sources import SyntheticSource
from jdistill.diffusion.schedules import make_schedule
from jdistill.evaluate.gmm import mode_statistics
from jdistill.teachers.base import World
from jdistill.teachers.gmm import GaussianMixture, GMMTeacher


def build(config: ml_collections.ConfigDict, shardings_for=None) -> World:
    del shardings_for  # nothing to load
    t = config.teacher
    mixture = GaussianMixture(
        num_modes=t.gmm.num_modes, radius=t.gmm.radius, std=t.gmm.std, num_classes=t.gmm.num_classes
    )
    schedule = make_schedule(**t.schedule.to_dict())

    def draw_conditions(rng: np.random.Generator, n: int):
        return {"cond": rng.integers(0, mixture.num_classes, n).astype(np.int32)}

    def draw_data(rng: np.random.Generator, n: int):
        x0, labels = mixture.sample(rng, n)
        return {"x0": x0, "cond": labels}

    def eval_batch(n: int) -> dict[str, np.ndarray]:
        return {"cond": (np.arange(n) % mixture.num_classes).astype(np.int32)}

    def evaluate(samples: np.ndarray, batch: dict) -> dict[str, float]:
        return mode_statistics(samples, batch["cond"], mixture.means, mixture.mode_labels)

    return World(
        teacher=GMMTeacher(mixture, schedule),
        frozen={"teacher": {}},
        frozen_axes={"teacher": {}},
        nets={},
        sample_shape=(2,),
        uncond=np.int32(mixture.null_label),
        conditions=SyntheticSource(draw_conditions, seed=config.seed),
        data=SyntheticSource(draw_data, seed=config.seed),
        num_classes=mixture.num_classes,
        eval_batch=eval_batch,
        evaluate=evaluate,
        reference_points=mixture.means,
    )
