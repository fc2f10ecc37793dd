"""The image input convention of the image metrics (FID, CLIP score): uint8 in [0, 255] or float in [0, 1]."""

from __future__ import annotations

import numpy as np

RANGE_SLACK = (
    1e-2  # float values this far outside [0, 1] are refused (a [-1, 1] VAE output is a common mistake)
)


def to_unit(images: np.ndarray) -> np.ndarray:
    """Decoded images in [-1, 1] (a VAE's output) -> float32 in [0, 1], the metrics' convention."""
    return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def checked_images(images: np.ndarray) -> np.ndarray:
    """RGB images (..., H, W, 3) as uint8 (kept) or float32, with float values checked to lie in [0, 1]."""
    x = np.asarray(images)
    if x.shape[-1:] != (3,):
        raise ValueError(f"images must be RGB (height, width, 3), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    if x.size:
        lo, hi = float(x.min()), float(x.max())
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                "(images in [-1, 1] map to [0, 1] by (x + 1) / 2)"
            )
    return x.astype(np.float32)
