"""Loading, overriding and validating configs, with errors that name the key and the valid choices.

Config files are Python modules with ``get_config(arg)`` (``path.py:arg`` passes ``arg``, which picks a
preset). Command-line overrides use ml_collections' syntax, ``--config.a.b=value``, and are parsed by the
type of the value they replace. Unknown keys never pass silently.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections
from etils import epath


class ConfigError(ValueError):
    """A problem with a config file, an override or a value; the message says which key and why."""


# ------------------------------------------------------------------------------------------------ loading


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Run ``get_config(arg)`` of the file in ``spec`` = ``path[:arg]``."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    name = "jdistill_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    cfg = module.get_config(arg or None)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"get_config in {path!r} must return an ml_collections.ConfigDict")
    return cfg


def choose_preset(arg: str | None, presets: Iterable[str], default: str) -> str:
    """The preset named by a config file's argument (``file.py:preset``)."""
    presets = list(presets)
    preset = arg or default
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; this config offers {presets}")
    return preset


# ---------------------------------------------------------------------------------------------- overrides


def tool_config(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[ml_collections.ConfigDict | None, argparse.Namespace]:
    """For tools that take a run config beside their own flags: ``--config=path.py[:preset]`` and
    ``--config.key=value`` overrides, the rest parsed by ``parser``. A missing ``--config`` is a usage error;
    a config that does not load is printed and (None, args) returned, for the tool to exit with status 1.
    ``args.config`` holds the spec."""
    spec, overrides, rest = split_config_args(argv)
    args = parser.parse_args(rest)
    args.config = spec
    if spec is None:
        parser.error("--config=path/to/recipe.py[:preset] is required")
    try:
        return load(spec, overrides), args
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None, args


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Separate ``--config``/``--config.key`` arguments from the others.

    Returns (config spec, [(dotted key, raw value)], remaining argv). Accepts ``--config.k=v``,
    ``--config.k v``, ``--config.flag`` (true) and ``--noconfig.flag`` (false).
    """
    spec, overrides, rest = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--config=", "-config=")):
            spec = arg.split("=", 1)[1]
        elif arg in ("--config", "-config"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a value: path/to/recipe.py[:preset]")
            spec = argv[i + 1]
            i += 1
        elif arg.startswith(("--config.", "--noconfig.")):
            negated = arg.startswith("--noconfig.")
            body = arg[len("--noconfig.") :] if negated else arg[len("--config.") :]
            if "=" in body:
                key, value = body.split("=", 1)
            elif negated:
                key, value = body, "false"
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, value = body, argv[i + 1]
                i += 1
            else:
                key, value = body, "true"
            if spec is None:
                raise ConfigError(f"--config.{key} comes before --config=...; give the config file first")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return spec, overrides, rest


def _unknown_key(prefix: str, key: str, node: ml_collections.ConfigDict) -> ConfigError:
    valid = sorted(node.keys())
    where = f"under {prefix!r}" if prefix else "at the top level"
    hint = difflib.get_close_matches(key, valid, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(
        f"unknown config key {'.'.join(filter(None, [prefix, key]))!r}{suggestion}; valid keys {where}: {valid}"
    )


def _parse_value(raw: str, current: Any, key: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key {key!r} expects {expected}, got {raw!r}")

    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(
            f"config key {key!r} is a section with keys {sorted(current.keys())}; set one of them"
        )
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise bad("a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise bad("an integer") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise bad("a tuple literal such as (1, 2)") from None
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return tuple(value)
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
    """Set ``cfg.<dotted>`` from a command-line string, parsed by the type of the current value."""
    parts = dotted.split(".")
    node, prefix = cfg, ""
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise _unknown_key(prefix, part, node)
        node, prefix = node[part], ".".join(filter(None, [prefix, part]))
    leaf = parts[-1]
    if leaf not in node:
        raise _unknown_key(prefix, leaf, node)
    value = _parse_value(raw, node[leaf], dotted)
    with node.ignore_type():
        node[leaf] = value


def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """Load a config file, apply overrides, validate, and lock it against new keys."""
    cfg = load_config_file(spec)
    for key, raw in overrides:
        apply_override(cfg, key, raw)
    validate(cfg)
    cfg.lock()
    return cfg


# --------------------------------------------------------------------------------------------- validation


def _choices() -> dict[str, tuple[str, ...]]:
    """Valid values of string settings, by leaf key name (wherever the key appears): the teacher's, the
    networks' and the methods' shared ones (``methods.shared_choices``)."""
    from jdistill.diffusion.parameterization import PREDICTION_TYPES
    from jdistill.diffusion.samplers import TIMESTEP_SPACINGS
    from jdistill.diffusion.schedules import BETA_SCHEDULES
    from jdistill.methods import shared_choices
    from jdistill.models import ARCHITECTURES, NETWORK_INITS
    from jdistill.models.attention import ATTENTION_IMPLS
    from jdistill.models.layers import REMAT_POLICIES

    return {
        **shared_choices(),
        "prediction": PREDICTION_TYPES,
        "arch": ARCHITECTURES,
        "beta_schedule": BETA_SCHEDULES,
        "spacing": TIMESTEP_SPACINGS,
        "unannotated": ("replicate", "fsdp"),
        "init": NETWORK_INITS,
        "attention_impl": ATTENTION_IMPLS,
        "dtype": ("float32", "bfloat16", "float16"),
        "compute_dtype": ("", "float32", "bfloat16", "float16"),
        "remat": ("", *REMAT_POLICIES, False, True),  # booleans: run configs written before policies
        "param_dtype": ("float32", "bfloat16", "float16"),
    }


def _path_choices(method: str) -> dict[str, tuple[str, ...]]:
    """Valid values by config path: the run's own settings and the method's (its ``CONFIG_CHOICES``)."""
    from jdistill.diffusion.schedules import SCHEDULE_KINDS
    from jdistill.methods import METHODS, config_choices
    from jdistill.teachers import WORLD_KINDS
    from jdistill.teachers.presets import PRESETS, UNCOND_RULES

    return {
        "method.name": METHODS,
        "teacher.kind": WORLD_KINDS,
        "teacher.schedule.kind": SCHEDULE_KINDS,
        "teacher.preset": tuple(PRESETS),
        "teacher.uncond": ("", *UNCOND_RULES),
        **(config_choices(method) if method in METHODS else {}),
    }


def _walk(node: ml_collections.ConfigDict, prefix: str = ""):
    for key in node:
        value = node[key]
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, ml_collections.ConfigDict):
            yield from _walk(value, path)
        else:
            yield path, key, value


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Check choices, ranges and the networks a method needs; raise ConfigError naming the first problem."""
    from jdistill.data.pipeline import PipelineOptions
    from jdistill.methods import method_module
    from jdistill.optim import LR_SCHEDULES, OPTIMIZERS

    by_key = _choices()
    by_path = _path_choices(cfg.method.name)
    for path, key, value in _walk(cfg):
        allowed = by_path.get(path)
        if allowed is None and path.endswith("optimizer.name"):
            allowed = OPTIMIZERS
        if allowed is None and path.endswith("optimizer.schedule"):
            allowed = LR_SCHEDULES
        if allowed is None and key in by_key:
            allowed = by_key[key]
        if allowed is not None and value not in allowed:
            raise ConfigError(f"config key {path!r} has value {value!r}; valid choices: {list(allowed)}")
    for key in ("num_steps", "batch_size", "log_every"):
        if cfg[key] <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {cfg[key]}")
    micro_batches = cfg.get("micro_batches", 1)  # run configs written before the key have none
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ConfigError(f"config key 'micro_batches' must be a positive integer, got {micro_batches!r}")
    if cfg.batch_size % micro_batches:
        raise ConfigError(
            f"batch_size={cfg.batch_size} must be divisible by micro_batches={micro_batches} (equal micro-batches)"
        )
    if not isinstance(cfg.get("split_updates", False), bool):
        raise ConfigError(f"config key 'split_updates' must be true or false, got {cfg.split_updates!r}")
    try:
        PipelineOptions.from_config(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    module = method_module(cfg.method.name)
    needed = tuple(getattr(module, "NETWORKS", ()))
    optional = tuple(getattr(module, "OPTIONAL_NETWORKS", ()))  # e.g. a GAN's discriminator
    have = tuple(cfg.networks.keys())
    if not set(needed) <= set(have) or not set(have) <= set(needed) | set(optional):
        extra = f" (and optionally {list(optional)})" if optional else ""
        raise ConfigError(
            f"method {cfg.method.name!r} trains networks {list(needed)}{extra}, but config.networks has "
            f"{list(have)}"
        )


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):  # JSON has no tuples; configs use tuples for fixed sequences
        return tuple(_tuples(v) for v in value)
    return value


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to ``workdir/config.json``, validated and locked."""
    path = epath.Path(workdir) / "config.json"  # the run directory may be remote (gs://)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is {workdir} a jdistill run directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from err
    cfg = ml_collections.ConfigDict(_tuples(data))
    validate(cfg)
    cfg.lock()
    return cfg
