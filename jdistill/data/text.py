"""Prompt tables (text, JSONL, parquet, array_record incl. TFDS) and the prompt source drawing batches from them.

A table has ``len`` and ``take(indices) -> list[str]``. Text and JSONL files are read whole (a few million
prompts fit in memory); parquet and array_record tables read only the rows asked for, so a host reads just
its rows of each batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from jdistill.data.files import (
    ArrayRecordRows,
    ParquetRows,
    choose_column,
    detect_format,
    field_of,
    jsonl_records,
    string_value,
)
from jdistill.data.sources import draw_rows
from jdistill.data.tf_example import example_value, looks_like_example

PROMPT_FIELDS = ("prompt", "text", "caption")  # tried in this order when no field is configured
PROMPT_FORMATS = ("text", "jsonl", "parquet", "array_record")


class PromptTable(Protocol):
    path: str

    def __len__(self) -> int: ...

    def take(self, indices: Sequence[int]) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class PromptList:
    """Prompts held in memory."""

    prompts: tuple[str, ...]
    path: str = "<memory>"

    def __post_init__(self):
        if not self.prompts:
            raise ValueError(f"{self.path} holds no prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices: Sequence[int]) -> list[str]:
        return [self.prompts[int(i)] for i in indices]


def _checked(value: object, where: str, field: str) -> str:
    return string_value(value, where, f"field {field!r}")


def _read_text(path: str) -> PromptList:
    with open(path, encoding="utf-8") as f:
        return PromptList(tuple(line.strip() for line in f if line.strip()), path)


def _read_jsonl(path: str, field: str) -> PromptList:
    prompts = tuple(
        _checked(field_of(record, field, PROMPT_FIELDS, where), where, field or "prompt")
        for record, where in jsonl_records(path)
    )
    return PromptList(prompts, path)


class ParquetPrompts:
    """A string column of parquet files; reads only the row groups holding the requested rows."""

    def __init__(self, path: str, field: str = ""):
        self.path = path
        self.rows = ParquetRows(path)
        self.field = choose_column(field, PROMPT_FIELDS, self.rows.columns, path)
        if not len(self.rows):
            raise ValueError(f"{path} holds no prompts")

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: Sequence[int]) -> list[str]:
        values = self.rows.take(indices, [self.field])[self.field]
        return [
            _checked(v, self.rows.describe(int(i)), self.field) for i, v in zip(indices, values, strict=True)
        ]


def decode_prompt_record(record: bytes, field: str, where: str) -> str:
    """A record is a JSON object holding the prompt in ``field``, a serialized tf.train.Example (TFDS) with the
    prompt as bytes feature ``field`` (its first value), or the prompt itself in UTF-8."""
    if looks_like_example(record):
        value = example_value(record, field, PROMPT_FIELDS, where)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: the prompt feature is not UTF-8: {err}") from None
    if record[:1] == b"{":
        try:
            obj = json.loads(record)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} starts like JSON but does not parse: {err}") from None
        return _checked(field_of(obj, field, PROMPT_FIELDS, where), where, field or "prompt")
    try:
        return record.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is neither a JSON object nor UTF-8 text: {err}") from None


class ArrayRecordPrompts:
    """array_record files whose records are prompts (UTF-8), JSON objects or tf.train.Examples (TFDS)."""

    def __init__(self, path: str, field: str = ""):
        self.path = path
        self.field = field
        self.rows = ArrayRecordRows(path)
        if not len(self.rows):
            raise ValueError(f"{path} holds no prompts")

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: Sequence[int]) -> list[str]:
        records = self.rows.take(indices)
        return [
            decode_prompt_record(r, self.field, self.rows.describe(int(i)))
            for i, r in zip(indices, records, strict=True)
        ]


def open_prompts(path: str, field: str = "") -> PromptTable:
    """The prompt table at ``path``: .txt (one prompt per line, blank lines skipped), .jsonl, parquet or
    array_record. ``field`` names the JSON field or column; empty tries "prompt", "text", "caption"."""
    fmt = detect_format(path, PROMPT_FORMATS)
    if fmt == "text":
        return _read_text(path)
    if fmt == "jsonl":
        return _read_jsonl(path, field)
    if fmt == "parquet":
        return ParquetPrompts(path, field)
    return ArrayRecordPrompts(path, field)


def check_prompt_table(path: str, field: str = "") -> None:
    """Raise unless ``path`` is a prompt table holding at least one prompt, without reading it whole: a text or
    JSONL file is read up to its first non-blank line, parquet and array_record tables only for their row
    counts. FileNotFoundError for a missing path, ValueError for an unknown format or an empty table."""
    fmt = detect_format(path, PROMPT_FORMATS)
    if fmt in ("parquet", "array_record"):
        open_prompts(path, field)  # raises when the table has no rows
        return
    with open(path, encoding="utf-8") as f:
        if not any(line.strip() for line in f):
            raise ValueError(f"{path} holds no prompts (it is empty or blank)")


def read_prompts(path: str, field: str = "") -> list[str]:
    """Every prompt of a prompt table, in order."""
    table = open_prompts(path, field)
    return [p for chunk in iter_prompts(table) for p in chunk]


def iter_prompts(table: PromptTable, chunk: int = 65536) -> Iterator[list[str]]:
    """A table's prompts in order, ``chunk`` at a time."""
    for start in range(0, len(table), chunk):
        yield table.take(range(start, min(start + chunk, len(table))))


def prompt_digest(table: PromptTable) -> str:
    """SHA-256 of the prompt list (length-prefixed UTF-8, so that prompts with newlines hash unambiguously)."""
    h = hashlib.sha256()
    for prompts in iter_prompts(table):
        for p in prompts:
            data = p.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """Batches of token ids from a prompt table, drawn uniformly with replacement from (seed, position): the
    picks cover the whole global batch, then only this host's ``rows`` are read and tokenized."""

    prompts: PromptTable | Sequence[str]
    tokenize: Callable[[list[str]], dict[str, np.ndarray]]  # list[str] -> {key: (n, T) ids}
    seed: int = 0

    def __post_init__(self):
        if not hasattr(self.prompts, "take"):
            object.__setattr__(self, "prompts", PromptList(tuple(self.prompts)))

    def local_batch(
        self, position: int, global_size: int, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        picks = draw_rows(self.seed, position, len(self.prompts), global_size, rows)
        return self.tokenize(self.prompts.take(picks))
