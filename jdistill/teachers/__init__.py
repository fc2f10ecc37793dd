"""Teachers and their worlds, selected by ``config.teacher.kind`` (module ``jdistill.teachers.<kind>_world``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import ml_collections

from jdistill.teachers.base import World

WORLD_KINDS = ("gmm", "diffusers", "digits", "flow")


def build_world(
    config: ml_collections.ConfigDict,
    shardings_for: Callable[[str, Any], Any] | None = None,
    *,
    abstract: bool = False,
) -> World:
    """The world of ``config.teacher``; ``shardings_for(name, net)`` gives the target shardings into which
    frozen networks are loaded (no full copy on one device). ``abstract``: a diffusers or flow teacher's shapes
    only (no weights or data read; other teachers are small and built as usual)."""
    kind = config.teacher.kind
    if kind not in WORLD_KINDS:
        raise ValueError(f"unknown teacher.kind {kind!r}; choose one of {list(WORLD_KINDS)}")
    if abstract and kind == "diffusers":
        from jdistill.teachers.diffusers_world import build_abstract

        return build_abstract(config)
    if abstract and kind == "flow":
        from jdistill.teachers.flow_abstract import build_abstract

        return build_abstract(config)
    return importlib.import_module(f"jdistill.teachers.{kind}_world").build(config, shardings_for)


__all__ = ["WORLD_KINDS", "World", "build_world"]
