"""Finding data files by format, and reading given rows of parquet and array_record files.

Both readers fetch only what is asked for, so that each host reads just its rows of a batch: parquet the row
groups holding the requested rows (the format's unit of random access: write large image sets with small row
groups, as Hugging Face datasets does), array_record the requested records. A path is a file, a directory of
shards (read in name order) or a glob pattern.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

FORMAT_HELP = {
    "text": ".txt file, one item per line",
    "jsonl": ".jsonl file, one JSON object per line",
    "parquet": ".parquet file, or a directory or glob of them",
    "array_record": ".array_record file (or TFDS shard name.array_record-00000-of-00004), or a directory or glob",
    "imagefolder": "directory with metadata.jsonl (Hugging Face imagefolder)",
}


def require(module: str, package: str, purpose: str) -> Any:
    """Import an optional dependency, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the {package!r} package: pip install {package} (or pip install 'jdistill[data]')"
        ) from err


def _is_array_record(name: str) -> bool:
    return name.endswith(".array_record") or ".array_record-" in name


def file_format(name: str) -> str | None:
    """The format of one file, by its name."""
    if _is_array_record(name):
        return "array_record"
    return {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}.get(os.path.splitext(name)[1].lower())


def detect_format(path: str, allowed: Sequence[str]) -> str:
    """The format of a data path (file, directory or glob), one of ``allowed``; an error names the path and
    the formats understood."""
    understood = "; ".join(f"{f}: {FORMAT_HELP[f]}" for f in allowed)
    if glob.has_magic(path):
        matches = sorted(glob.glob(path))
        if not matches:
            raise FileNotFoundError(f"{path} matches no files")
        found = {file_format(m) for m in matches}
    elif os.path.isdir(path):
        if os.path.exists(os.path.join(path, "metadata.jsonl")):
            found = {"imagefolder"}
        else:
            found = {file_format(n) for n in os.listdir(path)} & {"parquet", "array_record"}
    elif os.path.isfile(path):
        found = {file_format(os.path.basename(path))}
        if os.path.basename(path) == "metadata.jsonl":
            found = {"imagefolder"}
    else:
        raise FileNotFoundError(f"{path} does not exist")
    found.discard(None)
    if len(found) != 1 or next(iter(found)) not in allowed:
        what = f"found {sorted(found)}" if found else "format not recognised"
        raise ValueError(f"cannot read {path} ({what}); formats understood: {understood}")
    return found.pop()


def expand(path: str, fmt: str) -> list[str]:
    """The files of format ``fmt`` that a path names, in order."""
    if glob.has_magic(path):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if file_format(n) == fmt)
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no {fmt} files")
    return files


class _Chunks:
    """Rows numbered across consecutive chunks (files, row groups) of known sizes."""

    def __init__(self, sizes: Sequence[int], path: str):
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.path = path

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices, chunk of each, row within its chunk)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= len(self))]
        if bad.size:
            raise IndexError(f"row {int(bad[0])} is out of range: {self.path} has {len(self)} rows")
        chunk = np.searchsorted(self.offsets, idx, side="right") - 1
        return idx, chunk, idx - self.offsets[chunk]


class ParquetRows:
    """Given rows of given columns of one or more parquet files (same schema). Safe to read from several
    threads (the input pipeline's workers): each thread reads through its own file handles."""

    def __init__(self, path: str):
        pq = require("pyarrow.parquet", "pyarrow", f"reading {path}")
        self._open = pq.ParquetFile
        self._local, self._owner = threading.local(), threading.get_ident()
        self.path = path
        self.paths = expand(path, "parquet")
        self.files = [pq.ParquetFile(f) for f in self.paths]
        self.columns = list(self.files[0].schema_arrow.names)
        for f, file in zip(self.paths, self.files, strict=True):
            if list(file.schema_arrow.names) != self.columns:
                raise ValueError(
                    f"{f} has columns {file.schema_arrow.names}, unlike {self.paths[0]} ({self.columns})"
                )
        self.groups = [(i, g) for i, f in enumerate(self.files) for g in range(f.metadata.num_row_groups)]
        sizes = [self.files[i].metadata.row_group(g).num_rows for i, g in self.groups]
        self.chunks = _Chunks(sizes, path)

    def __len__(self) -> int:
        return len(self.chunks)

    def take(self, indices: Sequence[int], columns: Sequence[str]) -> dict[str, list]:
        idx, chunk, local = self.chunks.locate(indices)
        out: dict[str, list] = {c: [None] * len(idx) for c in columns}
        for c in np.unique(chunk):
            where = np.flatnonzero(chunk == c)
            file, group = self.groups[c]
            table = self._thread_file(file).read_row_group(group, columns=list(columns)).take(local[where])
            for name in columns:
                for i, value in zip(where, table.column(name).to_pylist(), strict=True):
                    out[name][i] = value
        return out

    def _thread_file(self, file: int):
        """This thread's handle of file number ``file`` (pyarrow does not promise that one ParquetFile reads
        safely from several threads at once)."""
        if threading.get_ident() == self._owner:
            return self.files[file]
        handles = self._local.__dict__.setdefault("files", {})
        if file not in handles:
            handles[file] = self._open(self.paths[file])
        return handles[file]

    def describe(self, index: int) -> str:
        """Where a row lives, for error messages."""
        _, chunk, local = self.chunks.locate([index])
        file, group = self.groups[chunk[0]]
        return f"row {index} ({self.paths[file]}, row group {group}, row {int(local[0])})"


class ArrayRecordRows:
    """Given records (bytes) of one or more array_record files."""

    def __init__(self, path: str):
        module = require("array_record.python.array_record_module", "array-record", f"reading {path}")
        self.path = path
        self.paths = expand(path, "array_record")
        # Options for random access rather than sequential read-ahead.
        self.readers = [
            module.ArrayRecordReader(p, "readahead_buffer_size:0,max_parallelism:0") for p in self.paths
        ]
        self.chunks = _Chunks([r.num_records() for r in self.readers], path)

    def __len__(self) -> int:
        return len(self.chunks)

    def take(self, indices: Sequence[int]) -> list[bytes]:
        idx, chunk, local = self.chunks.locate(indices)
        out: list[bytes] = [b""] * len(idx)
        for c in np.unique(chunk):
            where = np.flatnonzero(chunk == c)
            for i, record in zip(where, self.readers[c].read([int(x) for x in local[where]]), strict=True):
                out[i] = record
        return out

    def describe(self, index: int) -> str:
        _, chunk, local = self.chunks.locate([index])
        return f"record {index} ({self.paths[chunk[0]]}, record {int(local[0])})"


def jsonl_records(path: str) -> Iterator[tuple[Any, str]]:
    """(parsed record, "<path> line <n>") for every non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON: {err}") from None


def string_value(value: Any, where: str, what: str) -> str:
    """``value`` if it is a string; otherwise an error naming where it came from and what it should hold."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {what} holds {type(value).__name__}, not a string")
    return value


def field_of(record: Any, field: str, defaults: Sequence[str], where: str) -> Any:
    """The value of ``field`` (or the first of ``defaults`` present) in a JSON object."""
    names = (field,) if field else tuple(defaults)
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object with field {' / '.join(names)}")
    for name in names:
        if name in record:
            return record[name]
    raise ValueError(f"{where} has no field {' / '.join(names)} (its fields: {sorted(record)})")


def choose_column(field: str, defaults: Sequence[str], columns: Sequence[str], path: str) -> str:
    """The column named ``field`` (or the first of ``defaults`` there) of a table."""
    names = (field,) if field else tuple(defaults)
    for name in names:
        if name in columns:
            return name
    raise ValueError(f"{path} has no column {' / '.join(names)} (its columns: {list(columns)})")
