"""Image decode throughput of the input pipeline: synchronous reads vs grain worker threads.

    python benchmarks/data_throughput.py [--images 96] [--batch 32] [--batches 12] [--workers 1,2,4]

Writes a synthetic table (``--format`` parquet or array_record, row groups / records of one image) of
``--images`` 640x480 JPEGs (quality 90, smooth colour fields with texture: about the size and decode cost of
photos) with captions, then reads ``--batches`` host batches of ``--batch`` rows each through
``ImageTextSource`` at ``--resolution`` px (decode, shorter side resized bicubic to 512, centre crop) plus the
captions tokenized by a CLIP BPE tokenizer to 77 ids:

- synchronous: ``source.local_batch`` in a loop (the trainer before the pipeline);
- grain, N workers: ``pipeline.host_dataset`` with N threads and 2N batches of read-ahead;
- pipeline, N workers: the whole ``BatchPipeline`` including the transfer thread's global device batches.

Prints images/s for each (from the reader's creation to its last batch; the median of ``--repeats`` runs) against the need of a
step: ``--global-batch`` images every ``--step-time`` seconds, spread over ``--hosts`` hosts; and the time a
training loop that takes a host batch every (batch / need) seconds waits for data per step (its step a sleep,
as a device step leaves the host's cores free). Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from jdistill.data.images import ImageTextSource, open_image_text
from jdistill.data.pipeline import BatchPipeline, PipelineOptions, host_dataset


def photo_like(rng: np.random.Generator, width: int = 640, height: int = 480) -> bytes:
    """A JPEG with smooth colour gradients, a few shapes and fine texture (a plain noise image would be far
    larger and slower to decode than photos; a flat one far smaller)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.02), rng.uniform(0.002, 0.02), rng.uniform(0, 6.3)
        a[..., c] = 128 + 90 * np.sin(fx * x + fy * y + phase)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        a[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    a += rng.normal(0, 6, a.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_table(folder: str, fmt: str, count: int) -> tuple[str, float]:
    """The table's path and the mean JPEG size in KiB."""
    rng = np.random.default_rng(0)
    blobs = [photo_like(rng) for _ in range(count)]
    captions = [f"a photo of object {i} on a table, natural light" for i in range(count)]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.path.join(folder, "images.parquet")
        pq.write_table(pa.table({"image": blobs, "text": captions}), path, row_group_size=1)
    else:
        import base64
        import json

        from array_record.python.array_record_module import ArrayRecordWriter

        path = os.path.join(folder, "images.array_record")
        writer = ArrayRecordWriter(path, "group_size:1")
        for blob, caption in zip(blobs, captions, strict=True):
            writer.write(json.dumps({"image": base64.b64encode(blob).decode(), "text": caption}).encode())
        writer.close()
    return path, float(np.mean([len(b) for b in blobs]) / 1024)


def clip_tokenize(folder: str):
    """The digits world's CLIP tokenizer (byte-level BPE; no download), padded to CLIP's 77 ids."""
    from transformers import AutoTokenizer

    from jdistill.digits.tokenizer import write_tokenizer

    write_tokenizer(os.path.join(folder, "tokenizer"))
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        ids = tok(texts, padding="max_length", max_length=77, truncation=True).input_ids
        return {"input_ids.text_encoder": np.asarray(ids, np.int32)}

    return tokenize


def rate(make, count: int, batch: int) -> tuple[float, float]:
    """Images/s from creating the reader to its ``count``-th batch (so batches read ahead before the clock
    started cannot inflate it), and the process's CPU time over that wall time (above 1: threads ran at once,
    the GIL released while Pillow decodes and resizes)."""
    start, cpu = time.perf_counter(), time.process_time()
    batches = make()
    for _ in range(count):
        next(batches)
    elapsed = time.perf_counter() - start
    used = time.process_time() - cpu
    getattr(batches, "close", lambda: None)()
    return count * batch / elapsed, used / elapsed


def rate_batches(batches, count: int):
    """The first ``count + 1`` batches."""
    for _ in range(count + 1):
        yield next(batches)


def wait_per_step(batches, count: int, step_time: float) -> float:
    """Mean seconds a consumer that spends ``step_time`` per step (a sleep: the device's step, which holds no
    host core) waits for its next batch, over ``count`` steps after a warm-up batch."""
    next(batches)
    waited = 0.0
    for _ in range(count):
        time.sleep(step_time)
        start = time.perf_counter()
        next(batches)
        waited += time.perf_counter() - start
    return waited / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=32, help="rows a host reads per batch")
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per reader; the median is printed")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--format", choices=("parquet", "array_record"), default="parquet")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--step-time", type=float, default=1.0, help="seconds per step")
    p.add_argument(
        "--hosts", type=int, default=4, help="hosts sharing the global batch (32 GPUs, 8 per host)"
    )
    args = p.parse_args()

    need = args.global_batch / args.step_time / args.hosts  # images/s one host must deliver
    with tempfile.TemporaryDirectory() as folder:
        path, kib = write_table(folder, args.format, args.images)
        source = ImageTextSource(open_image_text(path), clip_tokenize(folder), args.resolution, seed=0)
        rows = np.arange(args.batch)
        n = args.batches
        sharding = jax.sharding.NamedSharding(
            jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), jax.sharding.PartitionSpec("data")
        )

        def synchronous():
            return (source.local_batch(pos, args.batch, rows) for pos in range(n + 1))

        def grain_threads(w):
            options = PipelineOptions(workers=w, prefetch=2 * w)
            return iter(host_dataset(source, 0, n + 1, args.batch, rows, options))

        def pipeline(w):
            options = PipelineOptions(workers=w, prefetch=2 * w)
            return BatchPipeline(
                source,
                start=0,
                stop=n + 1,
                global_size=args.batch,
                rows=rows,
                sharding=sharding,
                options=options,
            )

        readers = [("synchronous local_batch", synchronous)]
        for w in [int(x) for x in args.workers.split(",")]:
            label = f"{w} worker{'s' if w > 1 else ''}"
            readers += [
                (f"grain, {label}", lambda w=w: grain_threads(w)),
                (f"BatchPipeline, {label}", lambda w=w: pipeline(w)),
            ]

        print(
            f"{platform.machine()}, {os.cpu_count()} cores; {args.images} 640x480 JPEGs ({kib:.0f} KiB each) in "
            f"{args.format}; host batches of {args.batch} at {args.resolution} px, {n} timed, median of "
            f"{args.repeats}"
        )
        print(
            f"need: {args.global_batch} images per {args.step_time:g} s step on {args.hosts} hosts = {need:.0f} "
            f"images/s per host; a host batch of {args.batch} every {args.batch / need:.2f} s\n"
        )
        warm = iter(host_dataset(source, 0, 1, 1, rows[:1], PipelineOptions(workers=1, prefetch=1)))
        next(warm)  # grain's one-time start-up (about 0.5 s, once per process) stays out of the timings
        warm.close()
        cpu = time.process_time()
        for _ in rate_batches(synchronous(), n):
            pass
        per_image = (time.process_time() - cpu) / ((n + 1) * args.batch)
        print(
            f"CPU time per image (decode, resize, crop, tokenize; synchronous): {1000 * per_image:.1f} ms, so "
            f"{need * per_image:.2f} cores per host cover the need\n"
        )
        print("| reader | images/s | x synchronous | x host need | CPU / wall | data wait per step |")
        print("|---|---|---|---|---|---|")
        base = None
        for name, make in readers:
            runs = [rate(make, n, args.batch) for _ in range(args.repeats)]
            batches = make()
            wait = wait_per_step(batches, n, args.batch / need)
            getattr(batches, "close", lambda: None)()
            value, concurrency = (float(np.median([r[i] for r in runs])) for i in (0, 1))
            base = base or value
            print(
                f"| {name} | {value:.1f} | {value / base:.2f} | {value / need:.2f} | {concurrency:.2f} | "
                f"{wait:.3f} s |"
            )


if __name__ == "__main__":
    main()
