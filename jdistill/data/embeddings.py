"""Text-embedding cache: every training prompt's conditioning, encoded once by the teacher's text encoders.

A cache directory (written by ``tools/cache_embeddings.py``) holds

- ``embeddings.json``: the manifest (prompt count; conditioning keys with per-prompt shapes; dtype; the
  teacher's source and preset; the prompt file, field and SHA-256 of the prompt list);
- ``<key>.npy``: one (count, ...) array per conditioning key, row i for prompt i, read memory-mapped
  (``encoder_hidden_states``; ``text_embeds`` for SDXL);
- ``probe.npz``: the encoders' output for the empty prompt (a batch of one), which tells whether a run's
  text encoders are the ones that wrote the cache (a different checkpoint of the same preset would not be
  caught by names); a flow teacher's world, which loads no text encoder on a cache, takes it as its
  unconditional input;
- ``captions/<key>.npy`` (flow teachers, when the cache was written with ``teacher.data``): the conditioning
  of every caption of the image set, row i for image i as ``ImageTextSource`` indexes them; the manifest's
  ``captions`` records the image set's path, caption field, caption count and the SHA-256 of the captions.

The manifest's ``encoders`` describes the text encoders (flow teachers: the CLIP and T5 components and the
T5 length); a flow run compares it with its own. SDXL's ``time_ids`` are not cached: they follow from the
resolution, and the world adds them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import numpy as np

from jdistill.data.sources import draw_rows
from jdistill.data.text import PromptTable, prompt_digest

MANIFEST = "embeddings.json"
PROBE = "probe.npz"
CAPTIONS = "captions"  # subdirectory and manifest entry of the cached captions of teacher.data
COND = "cond."  # batch keys "cond.<conditioning key>"
CACHE_DTYPES = ("float32", "float16")
NOT_CACHED = ("time_ids",)
ENCODER_LABELS = {"t5_length": "T5 length", "clips": "CLIP components", "t5": "T5 component"}
PROBE_TOLERANCE = (
    5e-2  # relative L2 error: covers bfloat16 encoders and float16 storage; other weights give ~1
)


def _encode_rows(
    dst: str,
    texts: PromptTable,
    encode: Callable[[list[str]], Mapping[str, np.ndarray]],
    batch: int,
    dtype: str,
) -> dict[str, np.ndarray]:
    """Every text of ``texts`` through ``encode`` (``batch`` at a time, padded with empty prompts) into one
    memory-mapped ``dst/<key>.npy`` per conditioning key (flushed)."""
    os.makedirs(dst, exist_ok=True)
    count = len(texts)
    arrays: dict[str, np.ndarray] = {}
    for start in range(0, count, batch):
        chunk = texts.take(range(start, min(start + batch, count)))
        out = {k: np.asarray(v) for k, v in encode(chunk + [""] * (batch - len(chunk))).items()}
        out = {k: v for k, v in out.items() if k not in NOT_CACHED}
        if not arrays:
            arrays = {
                k: np.lib.format.open_memmap(
                    os.path.join(dst, f"{k}.npy"), "w+", np.dtype(dtype), (count, *v.shape[1:])
                )
                for k, v in out.items()
            }
        for k, v in out.items():
            arrays[k][start : start + len(chunk)] = v[: len(chunk)]
    for a in arrays.values():
        a.flush()
    return arrays


def write_embedding_cache(
    dst: str,
    prompts: PromptTable,
    encode: Callable[[list[str]], Mapping[str, np.ndarray]],
    *,
    info: dict,
    batch: int = 256,
    dtype: str = "float32",
    captions: PromptTable | None = None,
) -> dict:
    """Encode every prompt with ``encode`` (called with exactly ``batch`` prompts each time, padded with empty
    prompts, so that a jitted encoder compiles once; the probe is the empty prompt alone, as a world encodes
    it) and write the cache; returns the manifest. ``captions``: the captions of ``teacher.data`` in the image
    table's order (``images.caption_table``), encoded the same way into ``captions/`` (``info["captions"]``
    adds to their manifest entry). The manifest is written last: a directory without one is an interrupted
    write."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r}; choose one of {list(CACHE_DTYPES)}")
    if os.path.isdir(dst) and os.listdir(dst):
        raise FileExistsError(f"{dst} is not empty; choose a new directory for the embedding cache")
    os.makedirs(dst, exist_ok=True)
    arrays = _encode_rows(dst, prompts, encode, batch, dtype)
    probe = {k: np.asarray(v) for k, v in encode([""]).items() if k not in NOT_CACHED}
    np.savez(os.path.join(dst, PROBE), **probe)
    manifest = {
        "count": len(prompts),
        "dtype": dtype,
        "keys": {k: {"shape": list(a.shape[1:])} for k, a in sorted(arrays.items())},
        "prompts": {"path": prompts.path, "sha256": prompt_digest(prompts), **info.get("prompts", {})},
        **{k: v for k, v in info.items() if k not in ("prompts", CAPTIONS)},
    }
    if captions is not None:
        if not len(captions):
            raise ValueError(f"{captions.path} holds no captions")
        _encode_rows(os.path.join(dst, CAPTIONS), captions, encode, batch, dtype)
        manifest[CAPTIONS] = {
            "path": captions.path,
            "count": len(captions),
            "sha256": prompt_digest(captions),
            **info.get(CAPTIONS, {}),
        }
    with open(os.path.join(dst, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


class EmbeddingCache:
    """A cache directory, opened memory-mapped."""

    def __init__(self, path: str):
        manifest = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest):
            raise FileNotFoundError(
                f"{path} holds no embedding cache ({MANIFEST} missing); make one with tools/cache_embeddings.py"
            )
        with open(manifest) as f:
            self.manifest = json.load(f)
        self.path = path
        self.count = int(self.manifest["count"])
        self.arrays = {}
        for key, spec in self.manifest["keys"].items():
            array = np.load(os.path.join(path, f"{key}.npy"), mmap_mode="r")
            if array.shape != (self.count, *spec["shape"]):
                raise ValueError(
                    f"{path}/{key}.npy has shape {array.shape}; the manifest says {(self.count, *spec['shape'])}"
                )
            self.arrays[key] = array
        self.captions: dict[str, np.ndarray] | None = None  # the captions of teacher.data, when cached
        if CAPTIONS in self.manifest:
            self.caption_count = int(self.manifest[CAPTIONS]["count"])
            self.captions = {}
            for key, spec in self.manifest["keys"].items():
                array = np.load(os.path.join(path, CAPTIONS, f"{key}.npy"), mmap_mode="r")
                if array.shape != (self.caption_count, *spec["shape"]):
                    raise ValueError(
                        f"{path}/{CAPTIONS}/{key}.npy has shape {array.shape}; the manifest says "
                        f"{(self.caption_count, *spec['shape'])}"
                    )
                self.captions[key] = array
        with np.load(os.path.join(path, PROBE)) as probe:
            self.probe = {k: probe[k] for k in probe.files}

    def verify(
        self,
        *,
        preset: str | None = None,
        prompts: PromptTable | None = None,
        probe: Mapping[str, np.ndarray] | None = None,
        source: str = "",
        encoders: Mapping | None = None,
        widths: Mapping[str, int] | None = None,
        captions: PromptTable | None = None,
    ) -> None:
        """Refuse a cache made for another preset, other prompts or other text encoders, naming what differs;
        checks what is given (a run checks the first two before it loads its networks).

        ``probe``: this run's conditioning for the empty prompt (batch of one); its keys and per-prompt shapes
        must be the cache's, and its values the cache's probe up to ``PROBE_TOLERANCE``.
        ``encoders``: this run's text encoders as the manifest describes them (each entry must equal the
        manifest's), for a run that loads no text encoder. ``widths``: the feature width the denoiser takes
        for each conditioning key (the keys must be the cache's). ``captions``: the captions of this run's
        ``teacher.data`` (``images.caption_table``); the cache must hold them, in the same order.
        """
        m, problems = self.manifest, []
        cached_preset = m.get("teacher", {}).get("preset")
        if preset is not None and cached_preset != preset:
            problems.append(f"teacher preset: cache {cached_preset!r}, run {preset!r}")
        if prompts is not None:
            cached, digest = m["prompts"], prompt_digest(prompts)
            if cached["sha256"] != digest or self.count != len(prompts):
                problems.append(
                    f"prompts: cache has {self.count} from {cached['path']} (sha256 {cached['sha256'][:12]}), "
                    f"run has {len(prompts)} from {prompts.path} (sha256 {digest[:12]})"
                )
        if captions is not None:
            problems += self._caption_problems(captions)
        if probe is not None:
            problems += self._encoder_problems(probe, source)
        if encoders is not None:
            cached = m.get("encoders", {})
            for k, want in encoders.items():
                if cached.get(k) != want:
                    problems.append(
                        f"text encoders' {ENCODER_LABELS.get(k, k)}: cache {cached.get(k)!r}, run {want!r}"
                    )
        if widths is not None:
            cached = {k: v["shape"][-1] for k, v in m["keys"].items()}
            if cached != dict(widths):
                problems.append(f"conditioning widths: cache {cached}, the teacher takes {dict(widths)}")
        if problems:
            raise ValueError(
                f"embedding cache {self.path} does not match this run: {'; '.join(problems)}. "
                "Rebuild it with tools/cache_embeddings.py"
            )

    def _caption_problems(self, captions: PromptTable) -> list[str]:
        cached = self.manifest.get(CAPTIONS)
        run = f"run has {len(captions)} from {captions.path}"
        if cached is None:
            return [
                f"captions of teacher.data: the cache holds none (written without teacher.data), {run}; "
                "write the cache with --config.teacher.data set"
            ]
        digest = prompt_digest(captions)
        if cached["sha256"] != digest or int(cached["count"]) != len(captions):
            return [
                f"captions of teacher.data: cache has {cached['count']} from {cached['path']} "
                f"(sha256 {cached['sha256'][:12]}), {run} (sha256 {digest[:12]})"
            ]
        return []

    def _encoder_problems(self, probe: Mapping[str, np.ndarray], source: str) -> list[str]:
        m, problems = self.manifest, []
        shapes = {k: list(np.shape(v)[1:]) for k, v in probe.items() if k not in NOT_CACHED}
        cached_shapes = {k: v["shape"] for k, v in m["keys"].items()}
        if shapes != cached_shapes:
            problems.append(f"conditioning shapes: cache {cached_shapes}, run {shapes}")
        else:
            for k in shapes:
                want, got = np.asarray(probe[k], np.float64)[:1], self.probe[k].astype(np.float64)
                err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
                if not err <= PROBE_TOLERANCE:
                    problems.append(
                        f"text encoders: their {k} for the empty prompt differs from the cache's by {err:.3g} "
                        f"(relative), so the cache was written with other weights "
                        f"(cache teacher {m.get('teacher', {}).get('source')!r}, run {source!r})"
                    )
        return problems

    def rows(self, indices) -> dict[str, np.ndarray]:
        """{"cond.<key>": rows} of prompts ``indices`` (e.g. an evaluation batch)."""
        return EmbeddingSource(self.arrays).take(np.asarray(indices, np.int64))

    def caption_rows(self, indices) -> dict[str, np.ndarray]:
        """{"cond.<key>": rows} of the cached captions of images ``indices`` of ``teacher.data``."""
        if self.captions is None:
            raise ValueError(f"embedding cache {self.path} holds no captions (written without teacher.data)")
        return EmbeddingSource(self.captions).take(np.asarray(indices, np.int64))

    def source(self, seed: int = 0) -> EmbeddingSource:
        return EmbeddingSource(self.arrays, seed)


class EmbeddingSource:
    """Batches {"cond.<key>": rows} of cached conditioning. Picks follow PromptSource's rule, so a run on the
    cache sees the same prompts, batch for batch, as one that encodes them on the fly."""

    def __init__(self, arrays: Mapping[str, np.ndarray], seed: int = 0):
        self.arrays = dict(arrays)
        self.count = len(next(iter(self.arrays.values())))
        self.seed = seed

    def local_batch(
        self, position: int, global_size: int, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        return self.take(draw_rows(self.seed, position, self.count, global_size, rows))

    def take(self, picks: np.ndarray) -> dict[str, np.ndarray]:
        order = np.argsort(
            picks, kind="stable"
        )  # memory-mapped reads in file order, then back to batch order
        inverse = np.argsort(order, kind="stable")
        return {COND + k: np.asarray(v[picks[order]])[inverse] for k, v in self.arrays.items()}
