"""Generate teacher ODE pairs (initial noise, conditioning, teacher output) for DMD's regression loss.

    python tools/make_ode_pairs.py --config configs/dmd.py:gmm --out DIR --count 4096 [--steps 50] [--batch 256]
        [--config.a.b=value ...]

The teacher runs its deterministic sampler (DDIM on VP schedules, flow Euler on rectified flow) with the
recipe's classifier-free guidance (``method.guidance_scale``, ``method.cfg_convention``) from prior noise,
over conditions drawn from the world's training source. Pairs go to DIR as one .npy per key: the condition
inputs (labels or token ids), ``z`` and ``x0``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from jdistill import configuration

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    config, args = configuration.tool_config(parser, argv)
    if config is None:
        return 1

    from jdistill.data.pairs import write_pairs
    from jdistill.methods.ode_pairs import generate_ode_pairs
    from jdistill.teachers import build_world

    world = build_world(config)
    m = config.method
    arrays = generate_ode_pairs(
        world,
        count=args.count,
        guidance_scale=m.guidance_scale,
        cfg_convention=m.cfg_convention,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
    )
    info = {
        "config": args.config,
        "steps": args.steps,
        "guidance_scale": m.guidance_scale,
        "cfg_convention": m.cfg_convention,
    }
    write_pairs(args.out, arrays, info)
    print(f"wrote {args.count} pairs ({', '.join(sorted(arrays))}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
