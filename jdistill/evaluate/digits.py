"""Metrics of the miniature digits world, read by the project's digit classifier.

For generated images (uint8 or [0, 1], (n, 32, 32, 3)) drawn for prompts with known (digit, colour):

- ``digit_accuracy`` / ``colour_accuracy``: the classifier reads the prompt's digit / colour; ``prompt_accuracy``:
  both at once;
- ``frechet_distance``: Frechet distance between the classifier's pooled features of the samples and of the
  real images (every digit in every colour: 1,797 x 6), the digits world's FID;
- ``diversity``: mean pairwise feature distance among samples of the same (digit, colour) prompt, divided by
  the same for the real images of that digit and colour, averaged over prompts with at least two samples:
  about 1 for samples as varied as the data, near 0 for a collapsed generator.
"""

from __future__ import annotations

import functools

import numpy as np

from jdistill.digits import data
from jdistill.digits.classifier import TrainedClassifier
from jdistill.evaluate.frechet import frechet_distance, statistics


def _mean_pairwise(x: np.ndarray) -> float:
    sq = np.sum(x**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    n = len(x)
    return float(np.sqrt(d2).sum() / (n * (n - 1)))


@functools.cache
def _reference(classifier: TrainedClassifier) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], float]]:
    """(mu, sigma, per-(digit, colour) mean pairwise distance) of the real images' features."""
    index = data.split("all")
    labels = data.digit_labels()
    n_colours = len(data.COLOUR_NAMES)
    feats = classifier.features(
        data.render(np.repeat(index, n_colours), np.tile(np.arange(n_colours), len(index)))
    )
    digits = np.repeat(labels[index], n_colours)
    colours = np.tile(np.arange(n_colours), len(index))
    spread = {
        (d, c): _mean_pairwise(feats[(digits == d) & (colours == c)].astype(np.float64))
        for d in range(10)
        for c in range(n_colours)
    }
    mu, sigma = statistics(feats)
    return mu, sigma, spread


def digits_metrics(
    classifier: TrainedClassifier, images: np.ndarray, digits: np.ndarray, colours: np.ndarray
) -> dict[str, float]:
    digits, colours = np.asarray(digits), np.asarray(colours)
    d_logits, c_logits = classifier.logits(images)
    d_ok = d_logits.argmax(-1) == digits
    c_ok = c_logits.argmax(-1) == colours
    feats = classifier.features(images).astype(np.float64)
    mu_ref, sigma_ref, spread = _reference(classifier)
    mu, sigma = statistics(feats)
    ratios = []
    for d, c in {(int(d), int(c)) for d, c in zip(digits, colours, strict=True)}:
        group = feats[(digits == d) & (colours == c)]
        if len(group) >= 2:
            ratios.append(_mean_pairwise(group) / spread[(d, c)])
    return {
        "digit_accuracy": float(d_ok.mean()),
        "colour_accuracy": float(c_ok.mean()),
        "prompt_accuracy": float((d_ok & c_ok).mean()),
        "frechet_distance": float(frechet_distance(mu, sigma, mu_ref, sigma_ref)),
        "diversity": float(np.mean(ratios)) if ratios else float("nan"),
    }
