"""Checks of the inputs a user names on the command line, run before any network loads or compiles.

Each failure is a ``ConfigError`` naming the setting (``--workdir``, ``mesh.*``, ``teacher.path``,
``teacher.prompts``, ``teacher.data``, ...) and what to do, so that a wrong path stops the run in a second
instead of after a teacher load or an XLA compile. The loaders check the same things again; these checks only
make the failures early and readable.
"""

from __future__ import annotations

import glob
import os
import uuid

import ml_collections

from jdistill import parallel, paths
from jdistill.configuration import ConfigError
from jdistill.data.tfds_source import PREFIX as TFDS_PREFIX

PIPELINE_KINDS = ("diffusers", "digits", "flow")  # teachers read from a diffusers pipeline directory
PROMPT_TABLE_HELP = "a prompt table: .txt (one prompt per line), .jsonl, .parquet or array_record"


def check(config: ml_collections.ConfigDict, workdir: str, mode: str = "train") -> None:
    """Run directory, mesh, teacher source, prompt tables and other named paths of a run, in that order."""
    check_workdir(workdir, mode)
    check_mesh(config)
    check_teacher_source(config)
    check_prompts(config)
    check_named_paths(config)


# ------------------------------------------------------------------------------------------ run directory


def check_workdir(workdir: str, mode: str = "train") -> None:
    """``--workdir`` exists (other modes than train read a run) or can be created, and a local one is
    writable."""
    path = paths.as_path(workdir)
    flag = f"--workdir={workdir}"
    if mode != "train" and not path.exists():
        raise ConfigError(
            f"{flag} does not exist: no run, no checkpoint to read; --mode {mode} reads a run that --mode train "
            "wrote"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} is a file, not a directory; choose a directory for the run")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"{flag}: cannot create the directory ({_reason(err)}); choose a writable place"
        ) from err
    if paths.is_remote(workdir):
        return  # object stores: a probe would cost a remote write; their errors name the bucket
    probe = path / f".jdistill-write-test-{uuid.uuid4().hex}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{flag}: cannot write in the directory ({_reason(err)}); choose a writable place"
        ) from err


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


# ------------------------------------------------------------------------------------------------- mesh


def check_mesh(config: ml_collections.ConfigDict) -> None:
    """The (data, fsdp) mesh of ``config.mesh`` fits the devices (``parallel.make_mesh`` raises otherwise)."""
    parallel.make_mesh(config.mesh)


# --------------------------------------------------------------------------------------------- teacher


def check_teacher_source(config: ml_collections.ConfigDict) -> None:
    """``teacher.path`` (or the preset's hub id when it is empty) is a directory, a hub id in the local Hugging
    Face cache, or a hub id that the loader may still download."""
    t = config.teacher
    if t.kind not in PIPELINE_KINDS:
        return
    src = t.path or _preset_source(t.preset)
    if not src:
        return  # an unknown preset: the world names it
    setting = (
        f"teacher.path={t.path!r}"
        if t.path
        else f"teacher.path is empty and preset {t.preset!r} reads {src!r}"
    )
    if os.path.isdir(src):
        return
    if os.path.exists(src):
        raise ConfigError(
            f"{setting}: that is a file; give a diffusers pipeline directory or a hub id owner/name"
        )
    if _looks_local(src) or not _valid_hub_id(src):
        raise ConfigError(
            f"{setting}: the directory does not exist and is not a hub id in the local Hugging Face cache; give "
            "a diffusers pipeline directory (or one converted by tools/convert_teacher.py) or a hub id owner/name"
        )
    if _in_hub_cache(src):
        return
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ConfigError(
            f"{setting}: not a local directory and not in the local Hugging Face cache, and HF_HUB_OFFLINE is "
            "set; download it where there is network (huggingface-cli download) or give its local directory"
        )
    # A hub id not cached yet: the loader downloads it (its error says so when there is no network).


def _preset_source(name: str) -> str:
    from jdistill.teachers.presets import PRESETS

    preset = PRESETS.get(name)
    return getattr(preset, "hub_id", "") if preset is not None else ""


def _looks_local(src: str) -> bool:
    """Written as a path: absolute, relative to . or ~, or under a directory that exists here."""
    if src.startswith(("/", ".", "~")):
        return True
    first = src.split("/", 1)[0]
    return "/" in src and os.path.isdir(first)


def _valid_hub_id(src: str) -> bool:
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return src.count("/") == 1
    try:
        validate_repo_id(src)
    except HFValidationError:
        return False
    return "/" in src


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "model_index.json")
    return isinstance(found, str)


# ---------------------------------------------------------------------------------------------- prompts


def check_prompts(config: ml_collections.ConfigDict) -> None:
    """``teacher.prompts`` and ``teacher.eval_prompts``, when set, name prompt tables holding prompts; a
    pipeline teacher without built-in prompts needs ``teacher.prompts``."""
    from jdistill.data.text import check_prompt_table

    t = config.teacher
    if "prompts" not in t:
        return  # a teacher without prompts (the Gaussian mixture)
    built_in = t.kind == "digits" or (t.kind == "flow" and t.preset == "digits_flux")
    if not t.prompts and t.kind in PIPELINE_KINDS and not built_in:
        raise ConfigError(f"teacher.prompts is empty; name {PROMPT_TABLE_HELP}")
    for key in ("prompts", "eval_prompts"):
        path = t.get(key, "")
        if not path:
            continue
        try:
            check_prompt_table(path, t.get("prompt_field", ""))
        except (OSError, ValueError) as err:
            raise ConfigError(f"teacher.{key}={path!r}: {err}; give {PROMPT_TABLE_HELP}") from err


# ---------------------------------------------------------------------------------------- other paths

# Settings that name a local file or directory the run reads, with what belongs there.
NAMED_PATHS = {
    "teacher.data": "real images with captions (a folder with metadata.jsonl, .parquet or array_record, or "
    "tfds:<name>)",
    "teacher.embedding_cache": "the directory tools/cache_embeddings.py wrote",
    "method.pairs": "the directory tools/make_ode_pairs.py wrote",
}


def check_named_paths(config: ml_collections.ConfigDict) -> None:
    """The paths of ``NAMED_PATHS``, when set, exist (globs and remote paths are left to their readers)."""
    for key, what in NAMED_PATHS.items():
        section, _, leaf = key.rpartition(".")
        node = config
        for part in section.split("."):
            node = node.get(part) if node is not None and part in node else None
        path = node.get(leaf, "") if node is not None else ""
        if not path or not isinstance(path, str) or paths.is_remote(path) or glob.has_magic(path):
            continue
        if key == "teacher.data" and path.startswith(TFDS_PREFIX):
            continue  # a TFDS dataset's name: its reader says when it is not prepared
        if not os.path.exists(path):
            raise ConfigError(f"{key}={path!r} does not exist; give {what}")


def holds_results(workdir: str) -> bool:
    """Whether a run directory holds anything a failed run should keep: a checkpoint or a logged step."""
    path = paths.as_path(workdir)
    metrics = path / "metrics.jsonl"
    return paths.is_nonempty_dir(path / "checkpoints") or (
        metrics.exists() and bool(metrics.read_text().strip())
    )


def missing_root(workdir: str) -> str | None:
    """The outermost folder of ``workdir``'s path that does not exist yet (what a run creates), or None."""
    path, root = paths.as_path(workdir), None
    while not path.exists() and path.parent != path:
        path, root = path.parent, path
    return None if root is None else str(root)


def discard_empty_run(workdir: str, created_root: str) -> bool:
    """Removes a run directory that this run created (with its parents up to ``created_root``, where they hold
    nothing else) when it failed before saving a checkpoint or logging a step: what it holds then, config.json
    and empty folders, the command line says again. True if removed."""
    path = paths.as_path(workdir)
    if not path.is_dir() or holds_results(workdir):
        return False
    path.rmtree()
    root = paths.as_path(created_root)
    while path != root and path.parent.is_dir() and not any(path.parent.iterdir()):
        path = path.parent
        path.rmdir()
    return True
