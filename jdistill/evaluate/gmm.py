"""Quality of samples from a Gaussian-mixture world: mode hits, coverage, class consistency."""

from __future__ import annotations

import numpy as np


def mode_statistics(
    samples: np.ndarray,
    labels: np.ndarray,
    means: np.ndarray,
    mode_labels: np.ndarray,
    radius: float = 0.5,
) -> dict[str, float]:
    """Fraction of samples within ``radius`` of a mode, per-mode shares, and class consistency.

    A sample belongs to its nearest mode; ``class_consistency`` is the fraction whose nearest mode has the
    sample's own class label.
    """
    samples = np.asarray(samples, np.float64)
    dist = np.linalg.norm(samples[:, None, :] - means[None], axis=-1)
    nearest = dist.argmin(axis=1)
    shares = np.bincount(nearest, minlength=len(means)) / len(samples)
    stats = {
        "within_radius": float((dist.min(axis=1) < radius).mean()),
        "min_mode_share": float(shares.min()),
        "class_consistency": float((mode_labels[nearest] == np.asarray(labels)).mean()),
        "finite": float(np.isfinite(samples).all(axis=1).mean()),
    }
    stats.update({f"mode_share_{k}": float(s) for k, s in enumerate(shares)})
    return stats
