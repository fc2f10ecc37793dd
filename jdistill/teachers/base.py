"""What a recipe needs from the teacher side, bundled as a ``World``.

A world holds the teacher denoiser and its frozen parameters, the shape of one sample, the unconditional
conditioning, the data sources (conditions for data-free distillation, (x0, condition) pairs for training
on data), and how to draw evaluation conditions, score samples and write them to disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jdistill.data.sources import DataSource
from jdistill.diffusion.denoiser import Denoiser

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class World:
    teacher: Denoiser
    teacher_params: PyTree
    teacher_param_axes: PyTree  # logical axis names per teacher parameter (None: replicate)
    sample_shape: tuple[int, ...]
    uncond: PyTree  # conditioning meaning "no prompt"; broadcasts against a batch of conditions
    conditions: DataSource  # batches {"cond": ...}
    data: DataSource | None  # batches {"x0": ..., "cond": ...}
    num_classes: int  # for class-conditioned toy networks (0 for text-conditioned worlds)
    eval_conditions: Callable[[int], PyTree]  # n -> a balanced batch of conditions (host arrays)
    evaluate: Callable[[np.ndarray, PyTree], dict[str, float]]
    save_samples: Callable[[str, np.ndarray, PyTree], None]  # (path stem, samples, conditions)
