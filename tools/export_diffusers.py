"""Export a trained run to a diffusers pipeline directory.

    python tools/export_diffusers.py --workdir RUN --dst DIR [--dtype float32|float16|bfloat16] [--lora-merged]

Reads the run's resolved config (RUN/config.json), restores its latest checkpoint (the EMA weights when the
run samples with EMA), and writes a pipeline that ``DiffusionPipeline.from_pretrained(DIR)`` loads; the call
arguments that reproduce the student's sampler are printed and stored in DIR/jdistill_export.json.
A LoRA student is written as the teacher plus DIR/pytorch_lora_weights.safetensors (``pipe.load_lora_weights``),
or with the adapters merged into the UNet (--lora-merged).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--workdir", required=True, help="run directory (config.json, checkpoints/)")
    parser.add_argument("--dst", required=True, help="new directory for the pipeline")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument(
        "--lora-merged",
        action="store_true",
        help="LoRA students: write the UNet with the adapters merged (default: base UNet + LoRA file)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from jdistill import configuration, paths
    from jdistill.convert.core import ConversionError
    from jdistill.export import export_run

    try:
        config = configuration.load_run_config(args.workdir)
        dst = export_run(config, args.workdir, args.dst, dtype=args.dtype, lora_merged=args.lora_merged)
    except (
        configuration.ConfigError,
        ConversionError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    marker = paths.as_path(dst) / "jdistill_export.json"
    if marker.exists():
        print(f"wrote {dst}; generate with pipe(prompt, **{json.loads(marker.read_text())['call']})")
    else:
        print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
