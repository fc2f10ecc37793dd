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


def shared_choices() -> dict[str, tuple]:
    """Valid values of the string settings several methods share, by leaf key (wherever the key appears)."""
    from jdistill.diffusion.guidance import CFG_CONVENTIONS
    from jdistill.diffusion.parameterization import PREDICTION_TYPES
    from jdistill.methods.common import WEIGHTINGS
    from jdistill.methods.rollout import STUDENT_INPUTS

    return {
        "cfg_convention": CFG_CONVENTIONS,
        "fake_target": PREDICTION_TYPES,
        "target": ("", *PREDICTION_TYPES),
        "weighting": WEIGHTINGS,
        "fake_weighting": WEIGHTINGS,
        "student_input": STUDENT_INPUTS,
    }


def config_choices(name: str) -> dict[str, tuple]:
    """Valid values of method ``name``'s own string settings, by config path (``method.*`` and the arch of
    its extra networks): each method module declares them as ``CONFIG_CHOICES``."""
    return dict(getattr(method_module(name), "CONFIG_CHOICES", {}))


__all__ = [
    "METHODS",
    "Carry",
    "Network",
    "Recipe",
    "Update",
    "build_recipe",
    "config_choices",
    "method_module",
    "shared_choices",
]
