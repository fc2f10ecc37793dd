"""Prompt tables (text, JSONL, parquet, array_record), the prompt source's per-host reads, and the text-embedding
cache (tools/cache_embeddings.py) against on-the-fly encoding by the tiny pipelines' text encoders."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import REPO, load, tool

from jdistill.data.embeddings import PROBE, EmbeddingCache
from jdistill.data.text import PromptList, PromptSource, open_prompts, read_prompts
from jdistill.teachers import build_world

PROMPTS = ["a red circle", "the digit 3", "ünïcödé: 猫", "two\nlines", "a blue square on a green field"]


def _write_parquet(path, columns: dict, row_group_size: int) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def _write_array_record(path, records: list[bytes]) -> None:
    module = pytest.importorskip("array_record.python.array_record_module")
    writer = module.ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()


class Spy:
    """A prompt table that records which rows were read."""

    def __init__(self, table):
        self.table, self.path, self.read = table, table.path, []

    def __len__(self):
        return len(self.table)

    def take(self, indices):
        self.read.extend(int(i) for i in indices)
        return self.table.take(indices)


# --------------------------------------------------------------------------------------------------- formats


def test_text_and_jsonl_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("  a red circle \n\n the digit 3\n   \n")
    assert read_prompts(str(text)) == ["a red circle", "the digit 3"]

    jsonl = tmp_path / "p.jsonl"
    rows = [{"prompt": p, "text": "not this", "id": i} for i, p in enumerate(PROMPTS)]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_prompts(str(jsonl)) == PROMPTS  # "prompt" comes before "text"
    assert read_prompts(str(jsonl), field="text") == ["not this"] * len(PROMPTS)
    captions = tmp_path / "c.jsonl"
    captions.write_text("".join(json.dumps({"caption": p}) + "\n" for p in PROMPTS))
    table = open_prompts(str(captions))
    assert len(table) == len(PROMPTS) and table.take([4, 0, 4]) == [PROMPTS[4], PROMPTS[0], PROMPTS[4]]


def test_parquet_prompts_read_only_the_row_groups_they_need(tmp_path):
    prompts = [f"prompt number {i}" for i in range(20)]
    path = tmp_path / "p.parquet"
    _write_parquet(path, {"id": list(range(20)), "text": prompts}, row_group_size=4)
    table = open_prompts(str(path))
    assert len(table) == 20 and read_prompts(str(path)) == prompts

    groups = []
    file = table.rows.files[0]
    original = file.read_row_group
    file.read_row_group = lambda g, **kw: groups.append(g) or original(g, **kw)
    assert table.take([17, 2, 9, 2]) == [prompts[17], prompts[2], prompts[9], prompts[2]]
    assert sorted(groups) == [0, 2, 4]  # rows 2, 9, 17 live in row groups 0, 2, 4 of five

    # A directory of shards numbers rows across them, in file order.
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_parquet(shards / "train-00000-of-00002.parquet", {"caption": prompts[:7]}, 3)
    _write_parquet(shards / "train-00001-of-00002.parquet", {"caption": prompts[7:]}, 3)
    table = open_prompts(str(shards))
    assert len(table) == 20 and table.take([6, 7, 19, 0]) == [prompts[6], prompts[7], prompts[19], prompts[0]]
    assert read_prompts(str(shards / "*.parquet")) == prompts


def test_array_record_prompts_raw_and_json_in_shards(tmp_path):
    pytest.importorskip("array_record.python.array_record_module")
    raw = tmp_path / "raw.array_record"
    _write_array_record(raw, [p.encode() for p in PROMPTS])
    table = open_prompts(str(raw))
    assert len(table) == len(PROMPTS) and table.take([3, 1]) == [PROMPTS[3], PROMPTS[1]]
    assert read_prompts(str(raw)) == PROMPTS

    # TFDS-style shard names; JSON records with the prompt in "caption" (default rule) or a named field.
    shards = tmp_path / "tfds"
    shards.mkdir()
    records = [json.dumps({"caption": p, "label": i}).encode() for i, p in enumerate(PROMPTS)]
    _write_array_record(shards / "data-train.array_record-00000-of-00002", records[:2])
    _write_array_record(shards / "data-train.array_record-00001-of-00002", records[2:])
    assert read_prompts(str(shards)) == PROMPTS
    table = open_prompts(str(shards / "data-train.array_record-*"))
    assert table.take([4, 1, 2]) == [PROMPTS[4], PROMPTS[1], PROMPTS[2]]
    with pytest.raises(ValueError, match=r"holds int, not a string"):
        open_prompts(str(shards), field="label").take([0])


def test_array_record_prompts_from_tfds_examples(tmp_path):
    """TFDS writes serialized tf.train.Examples: text as a bytes feature, next to features of other kinds."""
    pytest.importorskip("array_record.python.array_record_module")
    pytest.importorskip("google.protobuf")
    from tf_example_proto import serialize_example

    path = tmp_path / "tfds-train.array_record-00000-of-00001"
    records = [serialize_example({"id": [i], "score": [0.5], "text": [p]}) for i, p in enumerate(PROMPTS)]
    _write_array_record(path, records)
    assert read_prompts(str(path)) == PROMPTS
    assert open_prompts(str(tmp_path)).take([3, 0]) == [PROMPTS[3], PROMPTS[0]]
    with pytest.raises(
        ValueError, match=r"record 1 .*\(a tf\.train\.Example\) has no field title .*\['text'\]"
    ):
        open_prompts(str(path), field="title").take([1])
    _write_array_record(tmp_path / "bad.array_record", [b"\x0a\x7f\x0a"])
    with pytest.raises(
        ValueError, match=r"record 0 .*bad\.array_record.*tf\.train\.Example\) does not parse"
    ):
        read_prompts(str(tmp_path / "bad.array_record"))


EMPTY_DIRECTORY = object()  # a prompt source that is an empty folder
NO_PROMPT_FIELD = '{"prompt": "fine"}\n{"caption_": "typo"}\n'


@pytest.mark.parametrize(
    ("name", "content", "options", "error", "message"),
    [
        (
            "prompts.csv",
            "a,b\n",
            {},
            ValueError,
            r"cannot read .*prompts\.csv .*formats understood: text: \.txt",
        ),
        ("nothing.txt", None, {}, FileNotFoundError, r"nothing\.txt does not exist"),
        ("none-*.parquet", None, {}, FileNotFoundError, r"matches no files"),
        ("empty.txt", "\n  \n", {}, ValueError, r"empty\.txt holds no prompts"),
        ("emptydir", EMPTY_DIRECTORY, {}, ValueError, r"emptydir \(format not recognised\)"),
        (
            "p.jsonl",
            NO_PROMPT_FIELD,
            {},
            ValueError,
            r"p\.jsonl line 2 has no field prompt / text / caption .*caption_",
        ),
        ("p.jsonl", NO_PROMPT_FIELD, {"field": "name"}, ValueError, r"p\.jsonl line 1 has no field name"),
        (
            "p.jsonl",
            '{"prompt": "fine"}\n{"prompt": 3\n',
            {},
            ValueError,
            r"p\.jsonl line 2 is not valid JSON",
        ),
    ],
    ids=[
        "unknown",
        "missing",
        "no_match",
        "empty",
        "empty_dir",
        "no_prompt_field",
        "no_named_field",
        "bad_json",
    ],
)
def test_bad_prompt_sources_are_named(tmp_path, name, content, options, error, message):
    source = tmp_path / name  # content None: nothing there
    if content is EMPTY_DIRECTORY:
        source.mkdir()
    elif content is not None:
        source.write_text(content)
    with pytest.raises(error, match=message):
        open_prompts(str(source), **options)


def test_bad_parquet_prompt_sources_are_named(tmp_path):
    parquet = tmp_path / "p.parquet"
    _write_parquet(parquet, {"words": ["a", "b"]}, 2)
    with pytest.raises(ValueError, match=r"p\.parquet has no column prompt / text / caption .*\['words'\]"):
        open_prompts(str(parquet))
    _write_parquet(
        tmp_path / "none.parquet", {"prompt": pytest.importorskip("pyarrow").array([], "string")}, 2
    )
    with pytest.raises(ValueError, match=r"none\.parquet holds no prompts"):
        open_prompts(str(tmp_path / "none.parquet"))
    with pytest.raises(IndexError, match=r"row 2 is out of range: .*p\.parquet has 2 rows"):
        open_prompts(str(parquet), field="words").take([2])


def test_bad_array_record_prompts_name_the_record(tmp_path):
    pytest.importorskip("array_record.python.array_record_module")
    path = tmp_path / "p.array_record"
    _write_array_record(path, [b'{"prompt": "ok"}', b'{"text_": "x"}', b"\xff\xfe"])
    table = open_prompts(str(path))
    assert table.take([0]) == ["ok"]
    with pytest.raises(ValueError, match=r"record 1 \(.*p\.array_record, record 1\) has no field prompt"):
        table.take([1])
    with pytest.raises(ValueError, match=r"record 2 .* is neither a JSON object nor UTF-8 text"):
        table.take([2])


# ---------------------------------------------------------------------------------------------------- source


def test_prompt_source_draws_the_global_batch_and_reads_only_its_rows(tmp_path):
    table = Spy(PromptList(tuple(f"p{i}" for i in range(50))))
    source = PromptSource(table, lambda ps: {"prompt": np.array(ps)}, seed=7)
    full = source.local_batch(3, 16)["prompt"]
    picks = np.random.default_rng([7, 3]).integers(0, 50, 16)  # the documented rule: (seed, position)
    np.testing.assert_array_equal(full, [f"p{i}" for i in picks])
    np.testing.assert_array_equal(source.local_batch(3, 16)["prompt"], full)
    assert not np.array_equal(source.local_batch(4, 16)["prompt"], full)

    table.read.clear()
    rows = np.array([1, 4, 5, 11])
    local = source.local_batch(3, 16, rows)["prompt"]
    np.testing.assert_array_equal(local, full[rows])
    assert table.read == [int(i) for i in picks[rows]]  # only this host's rows are read

    # A plain list still works (old callers), and the teachers module still exports the reader.
    from jdistill.teachers.prompts import read_prompts as old_read_prompts

    assert old_read_prompts is read_prompts
    listed = PromptSource(["a", "b"], lambda ps: {"prompt": np.array(ps)})
    assert set(listed.local_batch(0, 8)["prompt"]) <= {"a", "b"}


# ----------------------------------------------------------------------------------------- embedding cache


def _config(pipelines, preset, prompts, *extra):
    return load(
        f"tests/configs/tiny_unet.py:{preset}",
        [("teacher.path", str(pipelines[preset])), ("teacher.prompts", str(prompts)), *extra],
    )


def _cache(pipelines, preset, prompts, dst, *extra, dtype="float32") -> int:
    args = [f"--config={REPO}/tests/configs/tiny_unet.py:{preset}", f"--dst={dst}", "--batch=2"]
    extra = [("teacher.path", str(pipelines[preset])), ("teacher.prompts", str(prompts)), *extra]
    return tool("cache_embeddings").main(
        [*args, *(f"--config.{k}={v}" for k, v in extra), f"--dtype={dtype}"]
    )


@pytest.mark.parametrize("preset", ["sd", "sdxl"])
def test_cached_conditioning_equals_on_the_fly_encoding(tiny_pipelines, tmp_path, capsys, preset):
    prompts = tmp_path / "captions.jsonl"  # also: prompts from JSONL with a configured field
    prompts.write_text("".join(json.dumps({"id": i, "caption": p}) + "\n" for i, p in enumerate(PROMPTS)))
    field = ("teacher.prompt_field", "caption")
    assert _cache(tiny_pipelines, preset, prompts, tmp_path / "cache", field) == 0
    assert f"encoded {len(PROMPTS)} prompts" in capsys.readouterr().out

    config = _config(tiny_pipelines, preset, prompts, field)
    world = build_world(config)
    assert world.data is None  # no teacher.data: no image-text source
    prepare = jax.jit(world.prepare)
    # Row i of the cache is prompt i, encoded on the fly by the world's text encoders.
    want = jax.device_get(prepare(world.frozen, world.conditions.tokenize(PROMPTS))["cond"])
    cache = EmbeddingCache(str(tmp_path / "cache"))
    keys = {"encoder_hidden_states"} | ({"text_embeds"} if preset == "sdxl" else set())
    assert set(cache.arrays) == keys
    assert cache.manifest["teacher"]["preset"] == {"sd": "sd15", "sdxl": "sdxl"}[preset]
    for k in keys:  # batches of 2 there, 5 here: XLA's float32 sums differ in the last bits
        np.testing.assert_allclose(cache.arrays[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # The cache's source yields the same prompts as the prompt source, batch for batch, and prepare passes its
    # "cond.<key>" entries through (adding SDXL's time_ids), for a whole batch and for a host's rows.
    source = cache.source(seed=config.seed)
    for position, rows in ((0, None), (5, np.array([0, 3, 6]))):
        batch = source.local_batch(position, 8, rows)
        assert sorted(batch) == sorted(f"cond.{k}" for k in keys)
        got = jax.device_get(prepare(world.frozen, batch)["cond"])
        ref = jax.device_get(prepare(world.frozen, world.conditions.local_batch(position, 8, rows))["cond"])
        assert got.keys() == ref.keys() == want.keys()
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)

    if preset == "sd":  # float16 storage: the same values rounded to float16
        assert _cache(tiny_pipelines, preset, prompts, tmp_path / "half", field, dtype="float16") == 0
        half = EmbeddingCache(str(tmp_path / "half"))
        assert half.arrays["encoder_hidden_states"].dtype == np.float16
        np.testing.assert_array_equal(
            half.arrays["encoder_hidden_states"], cache.arrays["encoder_hidden_states"].astype(np.float16)
        )


def test_a_cache_for_other_prompts_preset_or_encoders_is_refused(tiny_pipelines, tmp_path):
    prompts = tiny_pipelines["prompts"]
    assert _cache(tiny_pipelines, "sd", prompts, tmp_path / "sd") == 0
    use = ("teacher.embedding_cache", str(tmp_path / "sd"))

    config = _config(tiny_pipelines, "sd", prompts, use)
    cache = EmbeddingCache(str(tmp_path / "sd"))
    got = build_world(config).conditions.local_batch(2, 4, np.array([1, 2]))
    want = cache.source(config.seed).local_batch(2, 4, np.array([1, 2]))
    np.testing.assert_array_equal(got["cond.encoder_hidden_states"], want["cond.encoder_hidden_states"])

    other = tmp_path / "other.txt"
    other.write_text(prompts.read_text().replace("circle", "triangle"))
    with pytest.raises(
        ValueError, match=r"does not match this run: prompts: cache has 3 from .*prompts\.txt"
    ):
        build_world(_config(tiny_pipelines, "sd", other, use))
    with pytest.raises(ValueError, match=r"this run: teacher preset: cache 'sd15', run 'sdxl'\. Rebuild"):
        build_world(_config(tiny_pipelines, "sdxl", prompts, use))  # refused before the networks load

    # Same preset and prompts, other text encoder weights: caught by the probe (empty-prompt encoding).
    probe = dict(cache.probe)
    table = open_prompts(str(prompts))
    cache.verify(preset="sd15", prompts=table, probe=probe)
    wider = {"encoder_hidden_states": np.zeros((1, 16, 64), np.float32)}
    with pytest.raises(ValueError, match=r"conditioning shapes: cache .*\[16, 32\].*run .*\[16, 64\]"):
        cache.verify(probe=wider)
    np.savez(tmp_path / "sd" / PROBE, **{k: v * 1.5 + 0.1 for k, v in probe.items()})
    with pytest.raises(ValueError, match=r"text encoders: their encoder_hidden_states for the empty prompt"):
        EmbeddingCache(str(tmp_path / "sd")).verify(preset="sd15", prompts=table, probe=probe)
    with pytest.raises(FileNotFoundError, match=r"no embedding cache .*tools/cache_embeddings\.py"):
        EmbeddingCache(str(tmp_path))
    # The tool does not write over an existing cache.
    assert _cache(tiny_pipelines, "sd", prompts, tmp_path / "sd") == 1
