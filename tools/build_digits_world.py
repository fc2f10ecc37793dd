"""Rebuild the miniature digits world: classifier, tokenizer, text encoder, VAE, and the teacher's UNet.

    python tools/build_digits_world.py --out runs/digits_build [--install]

Stages (each a pure function of its seed; a stage whose output exists in --out is not redone, so an
interrupted build resumes, the UNet's training from its last checkpoint):

1. ``classifier/``: the digit and colour classifier (jdistill.digits.classifier), with its test accuracy;
2. ``init/``: a StableDiffusionPipeline directory with the tokenizer, the trained text encoder and VAE, and an
   untrained UNet (jdistill.digits.components);
3. ``sft/``: the UNet trained by the ``sft`` method, preset ``digits`` (configs/sft.py), on that pipeline;
4. ``teacher/``: the pipeline exported with the EMA UNet (jdistill.export), plus ``build.json`` with the
   metrics of every stage.

``--install`` then copies ``teacher/`` and ``classifier/`` into jdistill/assets/digits/, the shipped world.
Runs on the core install (no torch needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="build directory (resumable)")
    parser.add_argument("--steps", type=int, default=0, help="UNet training steps (0: the sft preset's)")
    parser.add_argument("--install", action="store_true", help="copy the result into jdistill/assets/digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from jdistill.digits.build import build_world, install

    record = build_world(args.out, unet_steps=args.steps, seed=args.seed, log=lambda m: print(m, flush=True))
    print(json.dumps(record, indent=2))
    if args.install:
        print(f"installed into {install(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
