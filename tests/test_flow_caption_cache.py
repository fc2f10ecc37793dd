"""The captions of ``teacher.data`` in a flow teacher's embedding cache, on the tiny FLUX-dev pipeline:
``tools/cache_embeddings.py`` with ``teacher.data`` encodes every caption of the image set (in the order
``ImageTextSource`` indexes them), and a world on that cache with ``teacher.data`` loads no text encoder yet
prepares image batches (latents and caption conditioning) exactly as the world that encodes the captions; a
cache without the captions, or with other captions, is refused, naming the problem."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tiny_flow_pipeline
from test_flow_embedding_cache import PROMPTS, cache_tool, config

from jdistill.data.embeddings import EmbeddingCache
from jdistill.data.images import CaptionTable, open_image_text
from jdistill.data.text import prompt_digest
from jdistill.teachers import build_world

PRESET = "flux_dev"
COND_KEYS = ["cond.encoder_hidden_states", "cond.pooled_projections"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, images):
    """The tiny FLUX-dev pipeline, the prompts, a cache written with teacher.data and one without."""
    root = tmp_path_factory.mktemp("flow_caption_cache")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    tiny_flow_pipeline.save_flux_pipeline(root / PRESET)
    assert cache_tool(root, PRESET, root / "with_captions", ("teacher.data", str(images))) == 0
    assert cache_tool(root, PRESET, root / "prompts_only") == 0
    return root


def test_cached_captions_prepare_as_the_encoding_world(root, images, capsys):
    cache = EmbeddingCache(str(root / "with_captions"))
    captions = CaptionTable(open_image_text(str(images)))
    assert [captions.take([i])[0] for i in (0, 7)] == ["a picture number 0", "a picture number 7"]
    m = cache.manifest["captions"]
    assert m["path"] == str(images) and m["count"] == 8 and m["sha256"] == prompt_digest(captions)
    assert cache.count == len(PROMPTS) and sorted(cache.captions) == sorted(cache.arrays)
    for k, rows in cache.captions.items():
        assert rows.shape == (8, *cache.arrays[k].shape[1:])
    assert EmbeddingCache(str(root / "prompts_only")).captions is None

    data = ("teacher.data", str(images))
    encoding = build_world(config(root, PRESET, data))
    cached = build_world(config(root, PRESET, data, ("teacher.embedding_cache", str(root / "with_captions"))))
    assert set(cached.frozen) == set(cached.nets) == {"teacher", "vae"}  # no CLIP, no T5
    assert {"text_encoder", "text_encoder_2"} <= set(encoding.frozen)

    prepare_cached, prepare_encoding = jax.jit(cached.prepare), jax.jit(encoding.prepare)
    pairs = [
        (cached.data.local_batch(3, 4), encoding.data.local_batch(3, 4)),
        (cached.data.local_batch(5, 8, np.arange(4)), encoding.data.local_batch(5, 8, np.arange(4))),
    ]
    for cached_batch, encoding_batch in pairs:
        assert sorted(cached_batch) == [*COND_KEYS, "images"]  # no token ids
        np.testing.assert_array_equal(cached_batch["images"], encoding_batch["images"])
        got = jax.device_get(prepare_cached(cached.frozen, cached_batch))
        want = jax.device_get(prepare_encoding(encoding.frozen, encoding_batch))
        assert got.keys() == want.keys() == {"x0", "cond"}
        np.testing.assert_array_equal(got["x0"], want["x0"])
        assert got["cond"].keys() == want["cond"].keys() == {"encoder_hidden_states", "pooled_projections"}
        for k in want["cond"]:
            assert got["cond"][k].dtype == np.float32
            np.testing.assert_array_equal(got["cond"][k], want["cond"][k], err_msg=k)

    # The abstract world (plans) on a cache offers the same image batches: images plus cached conditioning.
    abstract = build_world(
        config(root, PRESET, data, ("teacher.embedding_cache", str(root / "with_captions"))), abstract=True
    )
    shapes = {k: (v.shape, v.dtype) for k, v in abstract.data.local_batch(0, 4).items()}
    assert shapes == {k: (v.shape, v.dtype) for k, v in pairs[0][0].items()}


def test_a_cache_without_or_with_other_captions_is_refused(root, images, tmp_path):
    data = ("teacher.data", str(images))
    with pytest.raises(
        ValueError,
        match=r"does not match this run: captions of teacher\.data: the cache holds none \(written without "
        r"teacher\.data\), run has 8 from .*metadata\.jsonl; write the cache with --config\.teacher\.data",
    ):
        build_world(config(root, PRESET, data, ("teacher.embedding_cache", str(root / "prompts_only"))))

    # The same images with one caption changed: another caption set.
    lines = [json.loads(line) for line in images.read_text().splitlines()]
    lines[2]["text"] = "another caption"
    other = tmp_path / "metadata.jsonl"
    other.write_text(
        "\n".join(json.dumps({**x, "file_name": str(images.parent / x["file_name"])}) for x in lines)
    )
    with pytest.raises(
        ValueError,
        match=r"captions of teacher\.data: cache has 8 from .*metadata\.jsonl \(sha256 [0-9a-f]{12}\), run has "
        r"8 from .*metadata\.jsonl \(sha256 [0-9a-f]{12}\)\. Rebuild",
    ):
        build_world(
            config(
                root,
                PRESET,
                ("teacher.data", str(other)),
                ("teacher.embedding_cache", str(root / "with_captions")),
            )
        )
    # The cache with captions still serves runs without teacher.data.
    world = build_world(config(root, PRESET, ("teacher.embedding_cache", str(root / "with_captions"))))
    assert world.data is None and sorted(world.conditions.local_batch(0, 4)) == COND_KEYS
