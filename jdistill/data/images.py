"""Image-text tables and the source of real (image, caption) batches for GAN terms and data-trained recipes.

Formats:

- image folder: a directory with ``metadata.jsonl`` (Hugging Face imagefolder), one
  ``{"file_name": "relative/path.png", "text": "..."}`` per line; the path may also name metadata.jsonl;
- parquet: an image column holding encoded bytes, or a struct ``{"bytes", "path"}`` as Hugging Face datasets
  writes it, and a text column;
- array_record: one JSON object per record, ``{"image": "<base64 of the encoded file>", "text": "..."}``,
  or a serialized tf.train.Example (as TFDS writes) with the encoded image and the UTF-8 caption as bytes
  features;
- TFDS: ``tfds:<name>``, a TFDS dataset prepared in array_record, read through ``tfds`` (``tfds_source.py``).

The text field is configurable (empty: "text", "caption", "prompt", the first present), and so is the image
field (empty: "image", "jpg", "png", "webp"). Images are decoded with Pillow, turned upright by their EXIF
orientation, converted to RGB (alpha dropped), resized so that the shorter side is the resolution (bicubic,
antialiased) and centre-cropped square. Only the rows a host feeds are read and decoded.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image, ImageOps

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

TEXT_FIELDS = ("text", "caption", "prompt")
IMAGE_FIELDS = ("image", "jpg", "png", "webp")
IMAGE_FORMATS = ("imagefolder", "parquet", "array_record")


class ImageText(NamedTuple):
    image: bytes | str  # encoded image bytes, or a file path
    text: str
    where: str  # file and row, for error messages


class ImageTextTable(Protocol):
    path: str

    def __len__(self) -> int: ...

    def take(self, indices: Sequence[int]) -> list[ImageText]: ...

    def captions(self, indices: Sequence[int]) -> list[str]: ...


def _text(value: object, where: str) -> str:
    return string_value(value, where, "the caption")


class ImageFolder:
    """A directory of images with ``metadata.jsonl`` (file names relative to it, and captions)."""

    def __init__(self, path: str, text_field: str = ""):
        meta = path if os.path.isfile(path) else os.path.join(path, "metadata.jsonl")
        self.path, root = path, os.path.dirname(meta)
        self.items: list[ImageText] = []
        for record, where in jsonl_records(meta):
            name = field_of(record, "file_name", (), where)
            text = _text(field_of(record, text_field, TEXT_FIELDS, where), where)
            self.items.append(ImageText(os.path.join(root, name), text, where))
        if not self.items:
            raise ValueError(f"{meta} lists no images")

    def __len__(self) -> int:
        return len(self.items)

    def take(self, indices: Sequence[int]) -> list[ImageText]:
        return [self.items[int(i)] for i in indices]

    def captions(self, indices: Sequence[int]) -> list[str]:
        return [self.items[int(i)].text for i in indices]


class ParquetImages:
    """Parquet files with an image column (bytes, or a struct with "bytes" / "path") and a text column."""

    def __init__(self, path: str, text_field: str = "", image_field: str = ""):
        self.path = path
        self.rows = ParquetRows(path)
        self.text = choose_column(text_field, TEXT_FIELDS, self.rows.columns, path)
        self.image = choose_column(image_field, IMAGE_FIELDS, self.rows.columns, path)
        if not len(self.rows):
            raise ValueError(f"{path} holds no images")

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: Sequence[int]) -> list[ImageText]:
        values = self.rows.take(indices, [self.image, self.text])
        out = []
        for i, image, text in zip(indices, values[self.image], values[self.text], strict=True):
            where = self.rows.describe(int(i))
            if isinstance(image, dict):  # Hugging Face Image feature: bytes, or a path when bytes is null
                image = image.get("bytes") or image.get("path")
            if not isinstance(image, bytes | str) or not image:
                raise ValueError(f"{where}: column {self.image!r} holds no image bytes or path")
            out.append(ImageText(image, _text(text, where), where))
        return out

    def captions(self, indices: Sequence[int]) -> list[str]:
        """The captions alone (the text column is read, not the images)."""
        texts = self.rows.take(indices, [self.text])[self.text]
        return [_text(t, self.rows.describe(int(i))) for i, t in zip(indices, texts, strict=True)]


class ArrayRecordImages:
    """array_record files of JSON records ``{"image": base64 of the encoded image, "text": caption}`` or of
    tf.train.Examples with both as bytes features."""

    def __init__(self, path: str, text_field: str = "", image_field: str = ""):
        self.path, self.text_field, self.image_field = path, text_field, image_field
        self.rows = ArrayRecordRows(path)
        if not len(self.rows):
            raise ValueError(f"{path} holds no images")

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: Sequence[int]) -> list[ImageText]:
        out = []
        for i, record in zip(indices, self.rows.take(indices), strict=True):
            where = self.rows.describe(int(i))
            if looks_like_example(record):  # TFDS: encoded image and UTF-8 caption as bytes features
                image = example_value(record, self.image_field, IMAGE_FIELDS, where)
                text = example_value(record, self.text_field, TEXT_FIELDS, where)
                try:
                    out.append(ImageText(image, text.decode("utf-8"), where))
                except UnicodeDecodeError as err:
                    raise ValueError(f"{where}: the caption is not UTF-8: {err}") from None
                continue
            try:
                obj = json.loads(record)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{where} is not a JSON record: {err}") from None
            encoded = field_of(obj, self.image_field, IMAGE_FIELDS, where)
            try:
                image = base64.b64decode(encoded, validate=True)
            except (binascii.Error, TypeError, ValueError) as err:
                raise ValueError(f"{where}: the image field is not base64: {err}") from None
            out.append(
                ImageText(image, _text(field_of(obj, self.text_field, TEXT_FIELDS, where), where), where)
            )
        return out

    def captions(self, indices: Sequence[int]) -> list[str]:
        return [it.text for it in self.take(indices)]


def open_image_text(
    path: str, text_field: str = "", image_field: str = "", *, tfds_split: str = "train", tfds_dir: str = ""
) -> ImageTextTable:
    """The image-text table at ``path`` (image folder with metadata.jsonl, parquet or array_record), or the
    TFDS dataset ``tfds:<name>`` (split ``tfds_split`` under ``tfds_dir``, ``tfds_source.TfdsImages``)."""
    from jdistill.data.tfds_source import PREFIX, TfdsImages, is_tfds

    if is_tfds(path):
        return TfdsImages(path[len(PREFIX) :], tfds_split, tfds_dir, text_field, image_field)
    fmt = detect_format(path, IMAGE_FORMATS)
    if fmt == "imagefolder":
        return ImageFolder(path, text_field)
    if fmt == "parquet":
        return ParquetImages(path, text_field, image_field)
    return ArrayRecordImages(path, text_field, image_field)


def open_teacher_images(teacher: Mapping[str, Any]) -> ImageTextTable:
    """The image-text table a ``teacher`` config section names (``data``, its field and TFDS settings; run
    configs written before the TFDS settings read TFDS's defaults)."""
    return open_image_text(
        teacher["data"],
        teacher.get("data_field", ""),
        teacher.get("data_image_field", ""),
        tfds_split=teacher.get("tfds_split", "train"),
        tfds_dir=teacher.get("tfds_dir", ""),
    )


@dataclasses.dataclass(frozen=True)
class CaptionTable:
    """The captions of an image-text table as a prompt table (``path``, ``len``, ``take``), row i for image i
    as ``ImageTextSource`` indexes them: what ``tools/cache_embeddings.py`` encodes and a run on the cache
    compares (``prompt_digest``) with the cached ones."""

    images: ImageTextTable

    @property
    def path(self) -> str:
        return self.images.path

    def __len__(self) -> int:
        return len(self.images)

    def take(self, indices: Sequence[int]) -> list[str]:
        return self.images.captions(list(indices))


def decode_image(image: bytes | str, resolution: int, where: str = "image") -> np.ndarray:
    """Encoded bytes or a file -> uint8 (resolution, resolution, 3): upright, RGB, shorter side resized to
    ``resolution`` (bicubic; Pillow's resize filters over the whole footprint, so downscaling is antialiased),
    centre-cropped."""
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode the image of {where}: {err}") from None
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)), np.uint8)


@dataclasses.dataclass(frozen=True)
class ImageTextSource:
    """Batches {"images": uint8 (n, H, W, 3), token ids of the captions}, drawn uniformly with replacement from
    (seed, position) for the whole global batch; only this host's ``rows`` are read and decoded.

    ``cached`` (a flow teacher on an embedding cache, ``EmbeddingCache.caption_rows``): the captions'
    conditioning {"cond.<key>": rows} of the drawn image indices replaces the token ids (``tokenize`` unused)."""

    table: ImageTextTable
    tokenize: Callable[[list[str]], dict[str, np.ndarray]] | None
    resolution: int
    seed: int = 0
    cached: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None

    def local_batch(
        self, position: int, global_size: int, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        picks = draw_rows(self.seed, position, len(self.table), global_size, rows)
        items = self.table.take(picks)
        images = np.zeros((len(items), self.resolution, self.resolution, 3), np.uint8)
        for i, it in enumerate(items):
            images[i] = decode_image(it.image, self.resolution, it.where)
        if self.cached is not None:
            return {"images": images, **self.cached(picks)}
        return {"images": images, **self.tokenize([it.text for it in items])}
