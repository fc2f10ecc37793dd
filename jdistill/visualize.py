"""Pictures for humans: scatter plots of 2-D samples and image grids, written with Pillow."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

from jdistill import paths

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _save_png(img: Image.Image, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()  # encoded in memory, written whole: the path may be remote (gs://)
    img.save(buffer, format="PNG")
    paths.as_path(path).write_bytes(buffer.getvalue())


def scatter_png(
    path: str | os.PathLike,
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
    _save_png(img, path)


def image_grid_png(path: str | os.PathLike, images: np.ndarray, *, columns: int = 8) -> None:
    """Images (N, H, W, C) in [-1, 1] as one PNG grid."""
    images = np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)
    n, h, w, c = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    grid = np.full((rows * h, cols * w, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    _save_png(Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3]), path)
