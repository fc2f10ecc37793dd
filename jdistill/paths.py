"""Run-directory paths through ``etils.epath``: local directories and URLs (``gs://bucket/run``) alike.

Everything a run writes or reads in its directory (config, metrics, samples, checkpoints, export) goes through
these paths, never through ``open``/``os.path``/``shutil`` on the string, which only work locally. Object
stores have no append and no cross-store copy, so the helpers here stream whole files.
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
from etils import epath

CHUNK_BYTES = 64 << 20


def as_path(path: str | os.PathLike) -> epath.Path:
    return epath.Path(path)


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs (``gs://...``, any ``scheme://``): no local file system behind them."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> epath.Path:
    """A URL as it is, a local path made absolute (Orbax wants absolute checkpoint directories)."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file by streaming its bytes, so source and destination may live on different stores."""
    with as_path(src).open("rb") as fin, as_path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK_BYTES)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a directory tree file by file (``copy_file``), merging into ``dst``."""
    src, dst = as_path(src), as_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dst / child.name)
        else:
            copy_file(child, dst / child.name)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to any store (serialised in memory first: remote files are written whole)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    as_path(path).write_bytes(buffer.getvalue())


def is_nonempty_dir(path: str | os.PathLike) -> bool:
    path = as_path(path)
    return path.is_dir() and any(True for _ in path.iterdir())
