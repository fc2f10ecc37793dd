"""TFDS datasets as image-text tables: ``teacher.data = "tfds:<name>"`` (e.g. ``tfds:coco_captions/2017``).

The dataset must already be prepared in ``array_record`` format under ``teacher.tfds_dir`` (empty: TFDS's
default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), e.g. with
``tfds build coco_captions --file_format=array_record``: array_record gives random access, so each host reads
only its rows of a batch, and TFDS reads it with NumPy alone (no TensorFlow at run time). Nothing is
downloaded by a run.

Records are parsed by the dataset's own features, except the image, which is kept encoded
(``tfds.decode.SkipDecoding``) and decoded like every other table's images (``images.decode_image``: upright,
RGB, shorter side resized, centre-cropped). Feature names are the dataset's, nested ones joined with "/"
(COCO captions: ``image`` and ``captions/text``); a caption feature holding a sequence of captions gives the
first one, so that image i always has the same caption (what an embedding cache of the captions encodes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jdistill.data.files import require
from jdistill.data.images import ImageText

PREFIX = "tfds:"
TEXT_FIELDS = ("text", "caption", "prompt", "captions/text")
IMAGE_FIELDS = ("image", "jpg", "png", "webp")


def is_tfds(path: str) -> bool:
    return path.startswith(PREFIX)


def _get(record: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        record = record[key]
    return record


def _choose(
    field: str, defaults: Sequence[str], names: Mapping[str, tuple[str, ...]], dataset: str, setting: str
) -> str:
    candidates = (field,) if field else tuple(defaults)
    for name in candidates:
        if name in names:
            return name
    raise ValueError(
        f"TFDS dataset {dataset} has no feature {' / '.join(candidates)} (its features: {list(names)}); "
        f"set {setting} to one of them"
    )


def _text(value: Any, where: str) -> str:
    """A Text feature's value (bytes), or the first of a sequence of them."""
    if isinstance(value, np.ndarray | list | tuple):
        if not len(value):
            raise ValueError(f"{where}: the caption sequence is empty")
        value = value[0]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: the caption is not UTF-8: {err}") from None
    if isinstance(value, str):
        return value
    raise ValueError(f"{where}: the caption feature holds {type(value).__name__}, not text")


class TfdsImages:
    """Split ``split`` of the TFDS dataset ``name`` (``name[/config][:version]``) as an image-text table
    (``ImageTextTable``: ``len``, ``take``, ``captions``)."""

    def __init__(
        self, name: str, split: str = "train", data_dir: str = "", text_field: str = "", image_field: str = ""
    ):
        tfds = require("tensorflow_datasets", "tensorflow-datasets", f"reading TFDS dataset {name!r}")
        self.path = f"{PREFIX}{name}[{split}]"
        where = f"TFDS dataset {name!r}" + (f" in {data_dir}" if data_dir else "")
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except Exception as err:  # unknown name and nothing on disk: TFDS's own message says which
            raise ValueError(f"cannot open {where}: {err}") from None
        if not builder.is_prepared():
            raise ValueError(
                f"{where} is not prepared under {builder.data_dir}; prepare it first (a run downloads nothing): "
                f"tfds build {name.split(':')[0]} --file_format=array_record"
                + (f" --data_dir={data_dir}" if data_dir else "")
            )
        file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
        if file_format != "array_record":
            raise ValueError(
                f"{where} was prepared as {file_format}, which has no random access; prepare it again with "
                "--file_format=array_record"
            )
        features = _features(builder.info.features)
        self.image = _choose(image_field, IMAGE_FIELDS, features, name, "teacher.data_image_field")
        self.text = _choose(text_field, TEXT_FIELDS, features, name, "teacher.data_field")
        self._image_keys, self._text_keys = features[self.image], features[self.text]
        decoders: dict = {}
        node = decoders
        for key in self._image_keys[:-1]:
            node = node.setdefault(key, {})
        node[self._image_keys[-1]] = tfds.decode.SkipDecoding()  # kept encoded: decode_image resizes it
        try:
            self.source = builder.as_data_source(split=split, decoders=decoders)
        except Exception as err:  # e.g. an unknown split
            raise ValueError(f"cannot read split {split!r} of {where}: {err}") from None
        if not len(self.source):
            raise ValueError(f"split {split!r} of {where} holds no examples")

    def __len__(self) -> int:
        return len(self.source)

    def _records(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"row {bad[0]} is out of range: {self.path} has {len(self)} rows")
        return list(self.source.__getitems__(idx))

    def take(self, indices: Sequence[int]) -> list[ImageText]:
        out = []
        for i, record in zip(indices, self._records(indices), strict=True):
            where = f"example {int(i)} of {self.path}"
            image = _get(record, self._image_keys)
            if isinstance(image, np.ndarray) and image.dtype == object:
                image = image.item()
            if isinstance(image, np.bytes_):
                image = bytes(image)
            if not isinstance(image, bytes) or not image:
                raise ValueError(f"{where}: feature {self.image!r} holds no encoded image")
            out.append(ImageText(image, _text(_get(record, self._text_keys), where), where))
        return out

    def captions(self, indices: Sequence[int]) -> list[str]:
        return [it.text for it in self.take(indices)]


def _features(features: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """The leaf features of a FeaturesDict: {name joined with "/": keys into a decoded record}. A Sequence of
    a dict (COCO's ``captions``) is walked into; its leaves hold one value per element."""
    out = {}
    for key, feature in features.items():
        keys = (*prefix, key)
        inner = getattr(feature, "feature", None)  # a Sequence's element feature
        if hasattr(feature, "items"):
            out.update(_features(feature, keys))
        elif inner is not None and hasattr(inner, "items"):
            out.update(_features(inner, keys))
        else:
            out["/".join(keys)] = keys
    return out
