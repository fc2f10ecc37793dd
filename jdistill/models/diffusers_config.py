"""diffusers ``config.json`` dicts to and from jdistill's frozen config dataclasses, which hold JSON lists as
tuples (hashable, so a config can be a static argument)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


def config_kwargs(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of the dataclass ``cls``, lists as tuples."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}


def field_values(cfg: Any) -> dict[str, Any]:
    """A dataclass instance's fields by name (not copied, unlike ``dataclasses.asdict``)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def to_json(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with tuples as lists, as config.json holds them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def check_block_types(
    model: str, down: Sequence[str], up: Sequence[str], down_supported: tuple, up_supported: tuple
) -> None:
    """Refuse the down / up block types (diffusers class names) that ``model`` does not implement."""
    bad = [b for b in down if b not in down_supported] + [b for b in up if b not in up_supported]
    if bad:
        raise ValueError(f"unsupported {model} blocks {bad}; supported: {down_supported + up_supported}")
