"""What a recipe needs from the teacher side, bundled as a ``World``.

A world holds the teacher denoiser, the frozen networks and their parameters (the teacher under "teacher";
text encoders and VAE where the teacher has them), the shape of one sample, the unconditional conditioning,
the data sources, and how to turn a host batch into model inputs, draw evaluation batches, score samples and
decode them to images. Writing samples to files is not a world's business: ``jdistill/sample_files.py``.

Batches are dicts of arrays. A source's batch goes through ``prepare(frozen, batch)`` on device (e.g. token
ids -> prompt embeddings) and must then hold "cond" (the denoiser's conditioning) and, for data sources, "x0".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jdistill.data.sources import DataSource
from jdistill.diffusion.denoiser import Denoiser
from jdistill.models.net import Net

PyTree = Any


def _identity(frozen, batch):
    return batch


@dataclasses.dataclass(frozen=True, eq=False)
class World:
    teacher: Denoiser
    frozen: dict[str, PyTree]  # frozen parameters by name; "teacher" always
    frozen_axes: dict[str, PyTree]  # logical axis names per frozen parameter (None: replicate)
    nets: dict[str, Net]  # modules of the frozen networks that have one (e.g. "teacher" for UNet teachers)
    sample_shape: tuple[int, ...]
    uncond: PyTree  # conditioning meaning "no prompt"; broadcasts against a batch of conditions
    conditions: DataSource  # batches that prepare into {"cond": ...}
    data: DataSource | None  # batches that prepare into {"x0": ..., "cond": ...}
    num_classes: int  # for class-conditioned toy networks (0 for text-conditioned worlds)
    eval_batch: Callable[[int], dict[str, np.ndarray]]  # n -> a host batch of evaluation conditions
    evaluate: Callable[[np.ndarray, dict], dict[str, float]]  # (samples, prepared host batch) -> metrics
    prepare: Callable[[dict[str, PyTree], dict], dict] = _identity  # (frozen, batch) -> batch, jittable
    source: str | None = None  # local directory of the teacher's pipeline, for export (diffusers worlds)
    decode: Callable[[np.ndarray], np.ndarray] | None = (
        None  # latent samples -> images in [-1, 1] (VAE worlds)
    )
    # n -> the prompts behind eval_batch(n), one per sample (text-to-image worlds; for the CLIP score)
    eval_prompts: Callable[[int], list[str]] | None = None
    # points the samples of a point world are drawn against in plots (the Gaussian mixture's modes)
    reference_points: np.ndarray | None = None
