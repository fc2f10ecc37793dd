"""FID and CLIP score of a run's decoded samples, as the trainer's evaluation asks for them (``config.eval``).

FID compares the Inception pool3 statistics of the samples with reference statistics computed once
(``tools/fid_stats.py``); the CLIP score pairs each sample with the evaluation prompt it was drawn for. Both
networks load once per run, at the first evaluation, and compile once (fixed batch shapes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from jdistill import paths
from jdistill.configuration import ConfigError


@dataclasses.dataclass
class ImageMetrics:
    """``config.eval``'s image metrics; networks load lazily (``None`` fields: that metric is off)."""

    fid_inception: str = ""
    fid_reference: str = ""
    clip_model: str = ""
    _features: object | None = None
    _reference: object | None = None
    _clip: object | None = None

    @classmethod
    def from_config(cls, settings: ml_collections.ConfigDict | None) -> ImageMetrics:
        """The metrics ``settings`` (``config.eval``) asks for, with every named file checked now: a missing
        one is a ConfigError before any compile, not a failure at the first evaluation hours later."""
        settings = settings or ml_collections.ConfigDict()
        inception, reference = settings.get("fid_inception", ""), settings.get("fid_reference", "")
        clip = settings.get("clip_model", "")
        if bool(inception) != bool(reference):
            raise ConfigError(
                "FID needs both eval.fid_inception (pytorch-fid's Inception weights) and eval.fid_reference "
                "(reference statistics from tools/fid_stats.py); set both or neither"
            )
        for key, path in (("fid_inception", inception), ("fid_reference", reference), ("clip_model", clip)):
            if path and not paths.as_path(path).exists():
                raise ConfigError(f"eval.{key}={path!r} does not exist")
        return cls(inception, reference, clip)

    @property
    def enabled(self) -> bool:
        return bool(self.fid_reference or self.clip_model)

    @property
    def needs_prompts(self) -> bool:
        return bool(self.clip_model)

    def __call__(self, images: np.ndarray, prompts: Sequence[str] | None) -> dict[str, float]:
        """``images``: (N, H, W, 3) in [0, 1]; ``prompts``: one per image (for the CLIP score)."""
        results = {}
        if self.fid_reference:
            from jdistill.evaluate.fid import InceptionFeatures, fid, load_statistics

            if self._features is None:
                # pytorch-fid's batch of 50, or fewer for a small evaluation (the batch does not change FID)
                batch = min(50, len(images))
                self._features = InceptionFeatures.from_file(os.fspath(self.fid_inception), batch_size=batch)
                self._reference = load_statistics(os.fspath(self.fid_reference))
            results["fid"] = float(fid(images, self._reference, self._features))
        if self.clip_model:
            from jdistill.evaluate.clip_score import CLIPScore

            if prompts is None or len(prompts) != len(images):
                raise ValueError("the CLIP score needs one evaluation prompt per sample")
            if self._clip is None:
                self._clip = CLIPScore.from_pretrained(os.fspath(self.clip_model))
            results["clip_score"] = float(self._clip(images, list(prompts)))
        return results
