"""Pictures for humans: scatter plots of 2-D samples and image grids, written with Pillow."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def scatter_png(
    path: str,
    points: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    reference: np.ndarray | None = None,
    extent: float = 3.0,
    size: int = 512,
    max_points: int = 4096,
) -> None:
    """A square scatter plot of (N, 2) points in [-extent, extent]^2, coloured by label; crosses at ``reference``."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def to_px(xy):
        return ((xy[0] + extent) / (2 * extent) * (size - 1), (extent - xy[1]) / (2 * extent) * (size - 1))

    points = np.asarray(points)[:max_points]
    labels = np.zeros(len(points), int) if labels is None else np.asarray(labels)[:max_points]
    for xy, lab in zip(points, labels, strict=True):
        if not np.all(np.isfinite(xy)):
            continue
        x, y = to_px(xy)
        draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=PALETTE[int(lab) % len(PALETTE)])
    for xy in [] if reference is None else reference:
        x, y = to_px(xy)
        draw.line((x - 6, y, x + 6, y), fill="black", width=2)
        draw.line((x, y - 6, x, y + 6), fill="black", width=2)
    img.save(path)
