"""A run's sample files: what ``samples/<name>*`` holds for samples a world's evaluation batch drew.

- ``<stem>.npy``: every sample, as drawn (latents for image worlds, points for the Gaussian mixture);
- ``<stem>.png``: a grid of the first 64 decoded images, or a scatter plot of the points with their class
  labels (``<stem>_labels.npy``) over the world's reference points;
- ``<stem>_prompts.txt``: one prompt per sample in order, for text-to-image worlds (what
  ``tools/evaluate.py --images <stem>.npy --prompts <stem>_prompts.txt`` reads back).

Worlds say what samples are (``decode``, ``reference_points``, ``eval_prompts``); this module writes them.
"""

from __future__ import annotations

import numpy as np

from jdistill import paths
from jdistill.teachers.base import World
from jdistill.visualize import image_grid_png, scatter_png

GRID = 64  # images in a grid


def save_samples(
    world: World, stem: str, samples: np.ndarray, batch: dict, prompts: list[str] | None
) -> None:
    """Writes ``samples`` (drawn for the host ``batch``, with ``prompts``, one per sample, or None) under
    ``stem`` (a local or remote path without suffix)."""
    if prompts is not None and len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts for {len(samples)} samples")
    paths.save_npy(f"{stem}.npy", samples)
    if world.decode is None:  # points, coloured by their class
        labels = np.asarray(batch["cond"])
        paths.save_npy(f"{stem}_labels.npy", labels)
        scatter_png(f"{stem}.png", samples, labels, reference=world.reference_points)
    else:
        image_grid_png(f"{stem}.png", world.decode(samples[:GRID]))
    if prompts is not None:
        paths.as_path(f"{stem}_prompts.txt").write_text("\n".join(prompts) + "\n")
