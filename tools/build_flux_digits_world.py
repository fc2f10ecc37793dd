"""Rebuild the miniature flow world: a FLUX-architecture digits teacher shipped as a FluxPipeline directory.

    python tools/build_flux_digits_world.py --out runs/flux_digits_build [--install]

Stages (each a pure function of its seed; a stage whose output exists in --out is not redone, so an
interrupted build resumes, the transformer's training from its last checkpoint):

1. ``init/``: a FluxPipeline directory with the digits world's CLIP tokenizer and text encoder (copied from the
   shipped digits teacher), a T5 tokenizer over the captions' words and a tiny T5 encoder trained to read them,
   a 16-channel VAE trained on the digits (shift and scale from its latents), an untrained FLUX transformer and
   the flow-matching Euler scheduler (jdistill.digits.flux_components);
2. ``sft/``: the transformer trained by the ``sft`` method, preset ``digits_flux`` (configs/sft.py), with
   its final metrics at the pipeline's 28 Euler steps with CFG;
3. the same evaluation at one Euler step;
4. ``teacher/``: the pipeline exported with the EMA transformer (jdistill.export), plus ``build.json`` with
   every stage's metrics and seconds.

``--install`` then copies ``teacher/`` and ``build.json`` into jdistill/assets/digits_flux/, the shipped world
(scored by the digits world's classifier, jdistill/assets/digits/classifier). Runs on the core install.
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
    parser.add_argument(
        "--steps", type=int, default=0, help="transformer training steps (0: the sft preset's)"
    )
    parser.add_argument(
        "--install", action="store_true", help="copy the result into jdistill/assets/digits_flux"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from jdistill.digits.flux_build import build_world, install

    record = build_world(args.out, steps=args.steps, seed=args.seed, log=lambda m: print(m, flush=True))
    print(json.dumps(record, indent=2))
    if args.install:
        print(f"installed into {install(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
