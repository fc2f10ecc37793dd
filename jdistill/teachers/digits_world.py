"""The miniature digits worlds: the shipped digits teachers, their own prompts and images, classifier metrics.

A diffusers world (``teacher.kind = "digits"``, preset "digits", default path the teacher shipped in
``jdistill/assets/digits/teacher``), or the flow world of the FLUX-architecture digits teacher
(``teacher.kind = "flow"``, preset "digits_flux", ``jdistill/assets/digits_flux/teacher``; the flow world
asks ``with_digits`` for these parts), whose training prompts are random captions of (digit, colour) pairs,
whose real images are the rendered data set (``teacher.data`` need not be set: LCM, sCM and the GAN terms get
real images), whose evaluation prompts are balanced over the 60 pairs with their labels, and whose metrics
are read by the project's digit classifier (``jdistill.evaluate.digits``) on VAE-decoded samples.
``teacher.prompts`` / ``teacher.data`` still override the built-in sources.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np

from jdistill.digits import data
from jdistill.evaluate.images import to_unit
from jdistill.teachers import diffusers_world
from jdistill.teachers.base import World
from jdistill.teachers.presets import DIGITS_CLASSIFIER

LABELS = ("digit", "colour")


def digits_teacher_config() -> ml_collections.ConfigDict:
    c = diffusers_world.diffusers_teacher_config("digits")
    c.kind = "digits"
    c.classifier = ""  # directory of the digit classifier; empty: the shipped one
    return c


def digits_flux_teacher_config() -> ml_collections.ConfigDict:
    """The ``teacher`` section of the flow digits world (kind "flow", preset "digits_flux")."""
    from jdistill.teachers.flow_world import flow_teacher_config

    c = flow_teacher_config("digits_flux")
    c.classifier = ""  # directory of the digit classifier; empty: the shipped one
    return c


def built_in_sources(seed: int) -> diffusers_world.BuiltInSources:
    def eval_batch(tokenize, n: int) -> dict[str, np.ndarray]:
        prompts = data.evaluation_prompts(n)
        return {
            **tokenize(prompts.prompts),
            "digit": prompts.digits.astype(np.int32),
            "colour": prompts.colours.astype(np.int32),
        }

    return diffusers_world.BuiltInSources(
        conditions=lambda tokenize: data.DigitsPromptSource(tokenize, seed=seed),
        data=lambda tokenize: data.DigitsImageSource(tokenize, seed=seed),
        eval_batch=eval_batch,
        eval_prompts=lambda n: list(data.evaluation_prompts(n).prompts),
    )


def load_world_classifier(config: ml_collections.ConfigDict):
    """The digit classifier ``teacher.classifier`` names (empty: the shipped one)."""
    from jdistill.digits.classifier import load_classifier

    return load_classifier(config.teacher.get("classifier", "") or DIGITS_CLASSIFIER)


def with_digits(world: World, classifier) -> World:
    """``world`` with the classifier's metrics on decoded samples of labelled evaluation batches. Its decode
    keeps the last samples' images, so that an evaluation that also scores FID or the CLIP score (which decode
    the same samples) decodes them once."""
    from jdistill.evaluate.digits import digits_metrics

    base_evaluate = world.evaluate
    decode = last_result(world.decode)

    def evaluate(samples: np.ndarray, batch: dict) -> dict[str, float]:
        results = base_evaluate(samples, batch)
        if all(k in batch for k in LABELS):
            images = to_unit(decode(samples))
            results.update(digits_metrics(classifier, images, batch["digit"], batch["colour"]))
        return results

    return dataclasses.replace(world, evaluate=evaluate, decode=decode)


def last_result(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``fn`` that returns its last result again when called with the very same array object (samples are
    never changed in place once drawn)."""
    last: list = []

    def once(x: np.ndarray) -> np.ndarray:
        if not (last and last[0] is x):
            last[:] = [x, fn(x)]
        return last[1]

    return once


def build(config: ml_collections.ConfigDict, shardings_for=None) -> World:
    t = config.teacher
    if t.preset != "digits":
        hint = " (the flow digits teacher is teacher.kind 'flow')" if t.preset == "digits_flux" else ""
        raise ValueError(f"teacher.kind 'digits' needs teacher.preset 'digits', got {t.preset!r}{hint}")
    classifier = load_world_classifier(config)  # before the networks: a missing file fails fast
    world = diffusers_world.build(config, shardings_for, built_in_sources(config.seed))
    return with_digits(world, classifier)
