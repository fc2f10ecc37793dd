"""Teachers and their worlds, selected by ``config.teacher.kind`` (module ``jdistill.teachers.<kind>_world``)."""

from __future__ import annotations

import importlib

import ml_collections

from jdistill.teachers.base import World

WORLD_KINDS = ("gmm",)


def build_world(config: ml_collections.ConfigDict) -> World:
    kind = config.teacher.kind
    if kind not in WORLD_KINDS:
        raise ValueError(f"unknown teacher.kind {kind!r}; choose one of {list(WORLD_KINDS)}")
    return importlib.import_module(f"jdistill.teachers.{kind}_world").build(config)


__all__ = ["WORLD_KINDS", "World", "build_world"]
