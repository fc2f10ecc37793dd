"""Distillation methods, each a module with ``default_config()`` and ``build(config, world) -> Recipe``."""

from __future__ import annotations

import importlib

import ml_collections

from jdistill.methods.recipe import Carry, Network, Recipe, Update

METHODS = ("sft", "swiftbrush", "dmd", "dmd2", "sid", "sid_lsg", "lcm", "scm", "meanflow")


def method_module(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method.name {name!r}; choose one of {list(METHODS)}")
    return importlib.import_module(f"jdistill.methods.{name}")


def build_recipe(config: ml_collections.ConfigDict, world) -> Recipe:
    return method_module(config.method.name).build(config, world)


__all__ = ["METHODS", "Carry", "Network", "Recipe", "Update", "build_recipe", "method_module"]
