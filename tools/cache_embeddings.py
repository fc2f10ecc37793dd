"""Encode every training prompt once with the teacher's text encoders, for --config.teacher.embedding_cache=DST.

    python tools/cache_embeddings.py --config configs/<recipe>.py[:preset] --dst DST [--batch 256]
        [--dtype float32|float16] [--config.a.b=value ...]

UNet teachers (teacher.kind=diffusers) and flow teachers (teacher.kind=flow: FLUX's CLIP-L and T5, SD3's
two CLIPs and T5, with --config.teacher.t5_length or the preset's T5 length). Only the text encoders are
loaded. DST gets one memory-mapped .npy per conditioning key (row i for prompt i of ``teacher.prompts``;
``encoder_hidden_states``, and ``text_embeds`` for SDXL or ``pooled_projections`` for flow teachers), the
encoders' output for the empty prompt (probe.npz) and a manifest (embeddings.json) that a run checks against
its own prompts, preset and encoders before using the cache. A flow run on the cache loads no text encoder.

Flow teachers with ``teacher.data`` (captioned images: the sft, scm, lcm and meanflow recipes): every caption
of the image set is encoded too, row i for image i as ``ImageTextSource`` indexes them, into DST/captions/
(one .npy per key); the manifest's ``captions`` records the set's path, field, caption count and SHA-256, which
a run with that ``teacher.data`` checks. (A UNet run keeps its text encoders and encodes captions per step.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from jdistill import configuration
    from jdistill.data.embeddings import CACHE_DTYPES

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dst", required=True)
    parser.add_argument("--batch", type=int, default=256, help="prompts per encoder call")
    parser.add_argument("--dtype", choices=CACHE_DTYPES, default="float32", help="storage dtype")
    config, args = configuration.tool_config(parser, argv)
    if config is None:
        return 1

    import jax

    from jdistill.data.embeddings import write_embedding_cache
    from jdistill.data.images import CaptionTable, open_teacher_images
    from jdistill.teachers import diffusers_world, flow_world

    t = config.teacher
    worlds = {"diffusers": diffusers_world, "flow": flow_world}
    if t.kind not in worlds:
        print(
            f"teacher.kind is {t.kind!r}: only diffusers (UNet) and flow teachers encode prompts",
            file=sys.stderr,
        )
        return 1
    if os.path.isdir(args.dst) and os.listdir(args.dst):  # before loading anything
        print(
            f"error: {args.dst} is not empty; choose a new directory for the embedding cache", file=sys.stderr
        )
        return 1
    try:
        prompts = diffusers_world.training_prompts(config)
        captions = None
        if t.data and t.kind == "flow":  # opened before any encoder loads
            captions = CaptionTable(open_teacher_images(t))
        encoder, params, source = worlds[t.kind].load_prompt_encoder(config)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    encode = jax.jit(encoder.encode)

    def encode_prompts(batch: list[str]):
        return jax.device_get(encode(params, encoder.tokenize(batch)))

    start = time.perf_counter()
    info = {
        "config": args.config,
        "teacher": {"kind": t.kind, "preset": t.preset, "source": source},
        "prompts": {"field": t.prompt_field},
        "encoders": encoder.describe(),
        "captions": {"field": t.data_field},
    }
    try:
        manifest = write_embedding_cache(
            args.dst,
            prompts,
            encode_prompts,
            info=info,
            batch=args.batch,
            dtype=args.dtype,
            captions=captions,
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    shapes = ", ".join(f"{k} {tuple(v['shape'])}" for k, v in manifest["keys"].items())
    with_captions = (
        f" and {manifest['captions']['count']} captions of {t.data}" if captions is not None else ""
    )
    print(
        f"encoded {manifest['count']} prompts{with_captions} ({shapes}, {args.dtype}) in "
        f"{time.perf_counter() - start:.1f} s to {args.dst}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
