"""TFDS datasets as ``teacher.data = "tfds:<name>"``: a tiny COCO-captions-like dataset built on disk by a TFDS
builder in array_record format, read back through ``tfds`` without TensorFlow; the batches' images and
captions are checked against the data written."""

from __future__ import annotations

import io
import pathlib
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jdistill import preflight
from jdistill.data.images import ImageTextSource, decode_image, open_image_text, open_teacher_images
from jdistill.data.pipeline import PipelineOptions, host_dataset
from jdistill.teachers.diffusers_world import diffusers_teacher_config

tfds = pytest.importorskip("tensorflow_datasets")

RES = 16
COUNT = 6


def _jpeg(i: int) -> bytes:
    """A solid colour per example (JPEG keeps a flat field within a level or two), 24 x 32."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (40 * i, 255 - 40 * i, 100)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _captions(i: int) -> list[str]:
    return [f"first caption of image {i}", f"second caption of image {i}"]


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """COCO captions' layout: an encoded image, ``image/id``, and a sequence of captions with ids."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "image/id": np.int64,
                    "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(COUNT)), "validation": self._generate_examples([7])}

    def _generate_examples(self, ids):
        for i in ids:
            captions = {"id": [10 * i, 10 * i + 1], "text": _captions(i)}
            yield i, {"image": _jpeg(i), "image/id": i, "captions": captions}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    TinyCaptions(data_dir=str(path)).download_and_prepare(file_format="array_record")
    return str(path)


def test_the_builder_wrote_array_record_without_tensorflow(data_dir):
    # tfds's NumPy path imports no TensorFlow (a guard where TensorFlow is installed; here it is not at all).
    assert "tensorflow" not in sys.modules
    files = list((pathlib.Path(data_dir) / "tiny_captions" / "1.0.0").glob("*.array_record*"))
    assert files, "no array_record shards written"


def test_tfds_table_gives_the_images_and_first_captions_written(data_dir):
    table = open_image_text("tfds:tiny_captions", tfds_dir=data_dir)
    assert len(table) == COUNT and table.path == "tfds:tiny_captions[train]"
    # TFDS shuffles examples when it writes them: find each one by its caption, then check its image.
    items = table.take(range(COUNT))
    by_caption = {it.text: it for it in items}
    assert sorted(by_caption) == sorted(_captions(i)[0] for i in range(COUNT))
    for i in range(COUNT):
        it = by_caption[_captions(i)[0]]
        want = np.asarray(Image.open(io.BytesIO(_jpeg(i))).convert("RGB").resize((RES, RES)))
        got = decode_image(it.image, RES, it.where)
        assert it.image == _jpeg(i)  # kept encoded, exactly as written
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    assert table.captions([2, 0]) == [items[2].text, items[0].text]

    other = open_image_text(
        "tfds:tiny_captions:1.0.0", "captions/text", "image", tfds_split="validation", tfds_dir=data_dir
    )
    assert [it.text for it in other.take([0])] == [_captions(7)[0]]


def test_tfds_batches_through_the_pipeline(data_dir):
    """A teacher section naming the dataset passes the run's preflight checks and gives a source whose
    worker-thread batches hold the drawn examples' images and captions."""
    config = ml_collections.ConfigDict({"teacher": diffusers_teacher_config("sd15")})
    config.teacher.data = "tfds:tiny_captions"
    config.teacher.tfds_dir = data_dir
    preflight.check_named_paths(config)  # a dataset's name, not a path that must exist
    table = open_teacher_images(config.teacher)

    def tokenize(texts):
        return {"input_ids.text_encoder": np.array([[int(t.split()[-1])] for t in texts], np.int32)}

    source = ImageTextSource(table, tokenize, RES, seed=4)
    rows = np.array([0, 2, 3])
    batches = list(iter(host_dataset(source, 0, 3, 4, rows, PipelineOptions(workers=2, prefetch=2))))
    for position, batch in enumerate(batches):
        picks = np.random.default_rng([4, position]).integers(0, COUNT, 4)[rows]
        ids = batch["input_ids.text_encoder"][:, 0]
        for image, example in zip(batch["images"], ids, strict=True):
            colour = np.array([40 * example, 255 - 40 * example, 100])
            assert np.abs(image.reshape(-1, 3).mean(0) - colour).max() <= 3, (position, example)
        # the examples drawn are the table's rows picked by the documented (seed, position) rule
        assert [int(t.split()[-1]) for t in table.captions(picks)] == list(ids)


def test_bad_tfds_settings_are_named(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"has no feature caption_text .*captions/text.*teacher.data_field"):
        open_image_text("tfds:tiny_captions", "caption_text", tfds_dir=data_dir)
    with pytest.raises(ValueError, match=r"cannot read split 'test'"):
        open_image_text("tfds:tiny_captions", tfds_split="test", tfds_dir=data_dir)
    with pytest.raises(
        ValueError, match=r"not prepared .*tfds build tiny_captions --file_format=array_record"
    ):
        open_image_text("tfds:tiny_captions", tfds_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"cannot open TFDS dataset 'no_such_set_xyz'"):
        open_image_text("tfds:no_such_set_xyz", tfds_dir=str(tmp_path / "empty"))
