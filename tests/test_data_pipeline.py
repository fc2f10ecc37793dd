"""The input pipeline (jdistill/data/pipeline.py): batches read and decoded in grain worker threads equal the
synchronous ``local_batch``; a pipeline resumed at a saved position yields exactly the batches of one that
never stopped; the trainer saves the position in its checkpoints and resumes there."""

from __future__ import annotations

import io
import json
import threading
import time

import jax
import numpy as np
import pytest
from helpers import assert_same_state_dict, small_swiftbrush
from PIL import Image

from jdistill import configuration, parallel, train
from jdistill.data.embeddings import EmbeddingSource
from jdistill.data.images import ImageTextSource, open_image_text
from jdistill.data.joint import JointSource
from jdistill.data.pipeline import BatchPipeline, PipelineOptions, host_dataset
from jdistill.data.sources import SyntheticSource
from jdistill.data.text import PromptSource

GLOBAL = 8
RES = 24
CAPTIONS = [f"caption {i}: {'word ' * i}" for i in range(11)]


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """Token ids of a stand-in tokenizer: the UTF-8 bytes, zero-padded to 32."""
    ids = np.zeros((len(texts), 32), np.int32)
    for i, t in enumerate(texts):
        b = t.encode()[:32]
        ids[i, : len(b)] = list(b)
    return {"input_ids.text_encoder": ids}


@pytest.fixture(scope="module")
def image_table(tmp_path_factory):
    """A parquet table of 11 JPEGs of different sizes and contents, with captions."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    blobs = []
    for i in range(len(CAPTIONS)):
        h, w = 30 + 3 * i, 50 - 2 * i
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    path = tmp_path_factory.mktemp("pipeline") / "images.parquet"
    pq.write_table(pa.table({"image": blobs, "text": CAPTIONS}), path, row_group_size=4)
    return open_image_text(str(path))


def _sources(table) -> dict:
    rng = np.random.default_rng(1)
    embeddings = {"encoder_hidden_states": rng.normal(size=(13, 5, 6)).astype(np.float32)}
    images = ImageTextSource(table, tokenize, RES, seed=5)
    prompts = PromptSource(CAPTIONS[::-1], tokenize, seed=5)
    return {
        "images": images,
        "prompts": prompts,
        "embeddings": EmbeddingSource(embeddings, seed=5),
        "prompts+images": JointSource((("conditions", prompts), ("data", images))),
    }


def _sharding(devices: int = 4) -> jax.sharding.NamedSharding:
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def _host(batch) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}


def test_worker_threads_decode_what_local_batch_decodes(image_table):
    """A host's rows, read and decoded by three worker threads, equal the synchronous reads position by
    position; the reads ran in grain's threads, not the consumer's."""
    source = _sources(image_table)["images"]
    threads = set()

    class Watched:
        def local_batch(self, position, global_size, rows):
            threads.add(threading.current_thread().name)
            return source.local_batch(position, global_size, rows)

    rows = np.array([1, 2, 5, 6])  # one host's rows of a global batch of 8
    options = PipelineOptions(workers=3, prefetch=5)
    got = list(iter(host_dataset(Watched(), 2, 9, GLOBAL, rows, options)))
    assert len(got) == 7
    for position, batch in zip(range(2, 9), got, strict=True):
        want = source.local_batch(position, GLOBAL, rows)
        assert batch["images"].shape == (4, RES, RES, 3) and batch["images"].std() > 10
        assert_same_state_dict(batch, want, f"position {position}")
        picks = np.random.default_rng([5, position]).integers(0, len(CAPTIONS), GLOBAL)[
            rows
        ]  # sources.py's rule
        want_ids = tokenize([CAPTIONS[i] for i in picks])["input_ids.text_encoder"]
        np.testing.assert_array_equal(batch["input_ids.text_encoder"], want_ids)
    assert threads and threading.current_thread().name not in threads


def test_without_workers_reads_happen_in_the_consumer_thread(image_table):
    source = _sources(image_table)["prompts"]
    threads = []

    class Watched:
        def local_batch(self, position, global_size, rows):
            threads.append(threading.current_thread())
            return source.local_batch(position, global_size, rows)

    options = PipelineOptions(workers=0, prefetch=0, device_prefetch=0)
    with BatchPipeline(
        Watched(),
        start=0,
        stop=3,
        global_size=GLOBAL,
        rows=np.arange(GLOBAL),
        sharding=_sharding(),
        options=options,
    ) as batches:
        for position, batch in enumerate(batches):
            assert_same_state_dict(
                _host(batch), source.local_batch(position, GLOBAL, None), f"position {position}"
            )
    assert threads == [threading.current_thread()] * 3


@pytest.mark.parametrize("kind", ["images", "prompts", "embeddings", "prompts+images"])
def test_a_resumed_pipeline_yields_the_batches_of_an_uninterrupted_one(image_table, kind):
    """Stopped after 3 batches with more read ahead, then started again at its position: the global device
    batches equal an uninterrupted pipeline's and the synchronous reads of each position."""
    source = _sources(image_table)[kind]
    sharding = _sharding()
    rows = parallel.local_rows(sharding, GLOBAL)
    options = PipelineOptions(workers=2, prefetch=4, device_prefetch=2)

    def pipeline(start: int) -> BatchPipeline:
        return BatchPipeline(
            source, start=start, stop=7, global_size=GLOBAL, rows=rows, sharding=sharding, options=options
        )

    with pipeline(0) as batches:
        straight = list(batches)
        assert batches.position == 7
    assert len(straight) == 7
    assert all(v.sharding == sharding and v.shape[0] == GLOBAL for b in straight for v in b.values())

    interrupted = []
    with pipeline(0) as batches:
        for _ in range(3):
            interrupted.append(next(batches))
        saved = batches.position
    assert saved == 3
    with pipeline(saved) as batches:
        interrupted += list(batches)

    for position, (a, b) in enumerate(zip(straight, interrupted, strict=True)):
        assert_same_state_dict(_host(a), _host(b), f"{kind} position {position}")
        assert_same_state_dict(
            _host(a), source.local_batch(position, GLOBAL, None), f"{kind} position {position}"
        )


def test_workers_read_ahead_of_the_consumer():
    requested = []
    source = SyntheticSource(lambda rng, n: {"x": rng.normal(size=(n, 2))}, seed=0)

    class Watched:
        def local_batch(self, position, global_size, rows):
            requested.append(position)
            return source.local_batch(position, global_size, rows)

    batches = iter(host_dataset(Watched(), 0, 100, GLOBAL, None, PipelineOptions(workers=2, prefetch=4)))
    next(batches)
    deadline = time.monotonic() + 10
    while len(requested) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    batches.close()
    assert sorted(requested)[:5] == [0, 1, 2, 3, 4]  # the next four, asked for before anyone wanted them


def test_a_read_error_surfaces_at_its_own_batch():
    source = SyntheticSource(lambda rng, n: {"x": rng.normal(size=(n, 2))}, seed=0)

    class Broken:
        def local_batch(self, position, global_size, rows):
            if position == 2:
                raise ValueError("cannot decode the image of row 3 (x.parquet)")
            return source.local_batch(position, global_size, rows)

    with BatchPipeline(
        Broken(), start=0, stop=5, global_size=GLOBAL, rows=np.arange(GLOBAL), sharding=_sharding()
    ) as batches:
        next(batches), next(batches)
        with pytest.raises(ValueError, match=r"cannot decode the image of row 3"):
            next(batches)


def test_pipeline_settings_are_checked():
    with pytest.raises(ValueError, match=r"data.prefetch=2 is below data.workers=4"):
        PipelineOptions(workers=4, prefetch=2)
    with pytest.raises(ValueError, match=r"data.device_prefetch must be a non-negative integer, got -1"):
        PipelineOptions(device_prefetch=-1)
    with pytest.raises(configuration.ConfigError, match=r"data.workers must be a non-negative integer"):
        small_swiftbrush(("data.workers", "-2"))
    with pytest.raises(configuration.ConfigError, match=r"unknown config key 'data.threads'"):
        small_swiftbrush(("data.threads", "2"))
    assert PipelineOptions.from_config(small_swiftbrush(("data.workers", "0"))).workers == 0
    assert PipelineOptions.from_config({}) == PipelineOptions()  # run configs written before the section


def _recording(monkeypatch) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The trainer's batches (position, host copy), as its pipeline hands them out."""
    seen = []

    class Recording(BatchPipeline):
        def __next__(self):
            position = self.position
            batch = super().__next__()
            seen.append((position, _host(batch)))
            return batch

    monkeypatch.setattr(train, "BatchPipeline", Recording)
    return seen


def _meta_file(workdir, step: int):
    return next((workdir / "checkpoints" / str(step) / "meta").glob("*"))


def test_the_trainer_resumes_its_pipeline_at_the_checkpointed_position(tmp_path, monkeypatch):
    seen = _recording(monkeypatch)
    config = small_swiftbrush(("num_steps", "6"), ("checkpoint.every", "3"))
    train.train(config, str(tmp_path / "straight"))
    straight = list(seen)
    assert [p for p, _ in straight] == list(range(6))

    seen.clear()
    train.train(small_swiftbrush(("num_steps", "3"), ("checkpoint.every", "3")), str(tmp_path / "resumed"))
    meta = json.loads(_meta_file(tmp_path / "resumed", 3).read_text())
    assert meta["data_position"] == 3
    train.train(config, str(tmp_path / "resumed"))
    assert [p for p, _ in seen] == list(range(6))
    for (position, a), (_, b) in zip(straight, seen, strict=True):
        assert_same_state_dict(a, b, f"step {position}")

    # The position comes from the checkpoint, not from the step: moved on by hand, the next run starts there.
    meta = json.loads(_meta_file(tmp_path / "resumed", 6).read_text())
    _meta_file(tmp_path / "resumed", 6).write_text(json.dumps({**meta, "data_position": 10}))
    seen.clear()
    longer = small_swiftbrush(("num_steps", "7"), ("checkpoint.every", "3"))
    train.train(longer, str(tmp_path / "resumed"))
    assert [p for p, _ in seen] == [10]
    s = train.setup(longer, None)
    assert_same_state_dict(
        seen[0][1], s.recipe.source(s.world).local_batch(10, longer.batch_size, s.rows), "position 10"
    )
