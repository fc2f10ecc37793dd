"""The text-embedding cache for flow teachers (FLUX: CLIP-L pooled + T5; SD3.5: two CLIPs + T5) on tiny
pipelines: ``tools/cache_embeddings.py`` writes it through its main(), and a world on it loads no text
encoder, yet conditions, evaluates and guides exactly as the world that encodes prompts; a cache made for
another preset, other prompts or another T5 length is refused, naming what differs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tiny_flow_pipeline
from helpers import REPO, flow_teacher, load, tool

from jdistill.data.embeddings import MANIFEST, EmbeddingCache
from jdistill.teachers import build_world

PROMPTS = ["a red circle", "the digit 3 on a blue square", "green of the square", "an 8"]
T5_LENGTH = {"flux_dev": 512, "sd35_medium": 256}
ENCODERS = {"flux_dev": ["text_encoder"], "sd35_medium": ["text_encoder", "text_encoder_2"]}
T5 = {"flux_dev": "text_encoder_2", "sd35_medium": "text_encoder_3"}


def overrides(root, preset: str, *extra) -> list[tuple[str, str]]:
    return [*flow_teacher(preset, root / preset, root / "prompts.txt"), ("teacher.resolution", "16"), *extra]


def config(root, preset: str, *extra):
    return load("configs/dmd2.py:digits", overrides(root, preset, *extra))


def cache_tool(root, preset: str, dst, *extra) -> int:
    """tools/cache_embeddings.py's main() for ``preset``: one batch of 4 prompts (as the world's batches)."""
    args = [f"--config={REPO}/configs/dmd2.py:digits", f"--dst={dst}", "--batch=4"]
    return tool("cache_embeddings").main(
        [*args, *(f"--config.{k}={v}" for k, v in overrides(root, preset, *extra))]
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny FLUX-dev and SD3.5 pipelines, the prompts, and each pipeline's cache written by the tool."""
    root = tmp_path_factory.mktemp("flow_cache")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    tiny_flow_pipeline.save_flux_pipeline(root / "flux_dev")
    tiny_flow_pipeline.save_sd3_pipeline(root / "sd35_medium")
    for preset in T5_LENGTH:
        assert cache_tool(root, preset, root / f"cache_{preset}") == 0
    return root


@pytest.mark.parametrize("preset", ["flux_dev", "sd35_medium"])
def test_cached_world_conditions_as_the_encoding_world_without_text_encoders(preset, root):
    cache = EmbeddingCache(str(root / f"cache_{preset}"))
    m = cache.manifest
    assert m["count"] == len(PROMPTS) and m["teacher"]["preset"] == preset and m["teacher"]["kind"] == "flow"
    assert m["encoders"]["clips"] == ENCODERS[preset] and m["encoders"]["t5"] == T5[preset]
    assert m["encoders"]["t5_length"] == T5_LENGTH[preset]
    assert sorted(cache.arrays) == sorted(cache.probe) == ["encoder_hidden_states", "pooled_projections"]

    encoding = build_world(config(root, preset))
    cached = build_world(config(root, preset, ("teacher.embedding_cache", str(root / f"cache_{preset}"))))
    assert set(encoding.frozen) == {"teacher", "vae", *ENCODERS[preset], T5[preset]}
    assert set(cached.frozen) == set(cached.nets) == set(cached.frozen_axes) == {"teacher", "vae"}
    assert cached.sample_shape == encoding.sample_shape
    for name in ("teacher", "vae"):  # the same networks, the same weights
        jax.tree.map(np.testing.assert_array_equal, cached.frozen[name], encoding.frozen[name])

    # The conditioning of a training batch (a host's rows too) and of an evaluation batch: the cached world
    # reads rows that the tool encoded, the encoding world encodes the same prompts per step.
    prepare_cached, prepare_encoding = jax.jit(cached.prepare), jax.jit(encoding.prepare)
    batches = [
        (cached.conditions.local_batch(3, 4), encoding.conditions.local_batch(3, 4)),
        (
            cached.conditions.local_batch(5, 8, np.arange(4)),
            encoding.conditions.local_batch(5, 8, np.arange(4)),
        ),
        (cached.eval_batch(4), encoding.eval_batch(4)),
    ]
    for cached_batch, encoding_batch in batches:
        assert sorted(cached_batch) == ["cond.encoder_hidden_states", "cond.pooled_projections"]
        assert not any(k.startswith("input_ids.") for k in cached_batch)
        got = jax.device_get(prepare_cached(cached.frozen, cached_batch)["cond"])
        want = jax.device_get(prepare_encoding(encoding.frozen, encoding_batch)["cond"])
        assert got.keys() == want.keys() == {"encoder_hidden_states", "pooled_projections"}
        for k in want:
            assert got[k].dtype == np.float32
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert cached.eval_batch(6)["cond.pooled_projections"].shape[0] == 6  # wraps around the 4 prompts

    # The unconditional input (SD3's true CFG with the empty prompt) is the cache's probe.
    assert jax.tree.map(np.shape, cached.uncond) == jax.tree.map(np.shape, encoding.uncond)
    jax.tree.map(np.testing.assert_array_equal, cached.uncond, encoding.uncond)


def test_a_cache_for_another_preset_prompts_or_t5_length_is_refused(root, images, tmp_path, capsys):
    use = ("teacher.embedding_cache", str(root / "cache_flux_dev"))
    with pytest.raises(ValueError, match=r"does not match this run: teacher preset: cache 'flux_dev', run "):
        build_world(config(root, "flux_schnell", ("teacher.path", str(root / "flux_dev")), use))
    other = tmp_path / "other.txt"
    other.write_text("\n".join(PROMPTS[::-1]) + "\n")
    with pytest.raises(ValueError, match=r"this run: prompts: cache has 4 from .*prompts\.txt .*other\.txt"):
        build_world(config(root, "flux_dev", ("teacher.prompts", str(other)), use))
    with pytest.raises(ValueError, match=r"this run: text encoders' T5 length: cache 512, run 256\. Rebuild"):
        build_world(config(root, "flux_dev", ("teacher.t5_length", "256"), use))

    # A cache written with another T5 length (--config.teacher.t5_length) is a cache of that length.
    assert cache_tool(root, "flux_dev", tmp_path / "short", ("teacher.t5_length", "256")) == 0
    assert "encoded 4 prompts (encoder_hidden_states (256, 24)" in capsys.readouterr().out
    short = ("teacher.embedding_cache", str(tmp_path / "short"))
    with pytest.raises(ValueError, match=r"T5 length: cache 256, run 512"):
        build_world(config(root, "flux_dev", short))
    world = build_world(config(root, "flux_dev", short, ("teacher.t5_length", "256")))
    assert world.uncond["encoder_hidden_states"].shape == (1, 256, 24)

    # Captioned images need their captions in the cache (this one was written without teacher.data); other
    # evaluation prompts would need the text encoders.
    with pytest.raises(ValueError, match=r"captions of teacher\.data: the cache holds none"):
        build_world(config(root, "flux_dev", use, ("teacher.data", str(images))))
    with pytest.raises(
        ValueError, match=r"teacher\.eval_prompts=.*other\.txt.* other prompts than the cached"
    ):
        build_world(config(root, "flux_dev", use, ("teacher.eval_prompts", str(other))))
    # An SD3.5 cache for a transformer of other widths (same preset name, other pipeline).
    cache = EmbeddingCache(str(root / "cache_sd35_medium"))
    with pytest.raises(
        ValueError, match=r"conditioning widths: cache .*'encoder_hidden_states': 72.*teacher"
    ):
        cache.verify(widths={"encoder_hidden_states": 4096, "pooled_projections": 64})
    # A UNet-style manifest without encoders is refused by name, too.
    manifest = json.loads((root / "cache_sd35_medium" / MANIFEST).read_text())
    manifest.pop("encoders")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / MANIFEST).write_text(json.dumps(manifest))
    for f in ("encoder_hidden_states.npy", "pooled_projections.npy", "probe.npz"):
        (tmp_path / "bare" / f).write_bytes((root / "cache_sd35_medium" / f).read_bytes())
    bare = ("teacher.embedding_cache", str(tmp_path / "bare"))
    with pytest.raises(ValueError, match=r"text encoders' CLIP components: cache None, run \['text_encoder'"):
        build_world(config(root, "sd35_medium", bare))

    # The tool does not write over an existing cache.
    assert cache_tool(root, "flux_dev", root / "cache_flux_dev") == 1
    assert "is not empty" in capsys.readouterr().err
