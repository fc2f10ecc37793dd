"""Convert a diffusers pipeline once into jdistill's fast-loading form, optionally verifying every component.

    python tools/convert_teacher.py --src DIR_OR_HUB_ID --dst DIR [--verify] [--dtype float32|bfloat16|float16]
        [--variant fp16] [--allow-pickle] [--tolerance REL]

``--verify`` runs each converted component and its PyTorch twin (built from --src) on the same random inputs
and prints the maximum absolute and relative error of every output; the exit status is 1 when any relative
error exceeds the tolerance (default 1e-4 for float32 storage, 3e-2 for 16-bit storage). Point a run at the
converted directory with --config.teacher.path=DIR.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--src", required=True, help="diffusers pipeline directory or hub id")
    parser.add_argument("--dst", required=True, help="new directory for the converted pipeline")
    parser.add_argument("--dtype", default="float32", choices=tuple(DEFAULT_TOLERANCE))
    parser.add_argument("--variant", default=None, help="weights variant to read, e.g. fp16")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="read .bin/.ckpt pickles (trusted sources only)"
    )
    parser.add_argument("--verify", action="store_true", help="compare every component with its PyTorch twin")
    parser.add_argument("--tolerance", type=float, default=None, help="max relative error for --verify")
    args = parser.parse_args(argv)

    from jdistill.convert.converted import convert_pipeline
    from jdistill.convert.core import ConversionError
    from jdistill.convert.io import resolve_source
    from jdistill.convert.pipeline import load_pipeline

    try:
        marker = convert_pipeline(
            args.src, args.dst, dtype=args.dtype, variant=args.variant, allow_pickle=args.allow_pickle
        )
    except (ConversionError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"converted {', '.join(marker['components'])} from {args.src} to {args.dst} ({args.dtype})")
    for name, cls in marker["skipped"].items():
        print(f"skipped {name} ({cls}, not used by a teacher): copied as files")
    if not args.verify:
        return 0

    from jdistill.convert.verify import format_errors, verify_component

    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
    src = resolve_source(args.src)
    errors = []
    for name in marker["components"]:  # one component in memory at a time, in both frameworks
        component = load_pipeline(args.dst, components=(name,), allow_download=False).components[name]
        errors += verify_component(name, component, src, variant=args.variant, allow_pickle=args.allow_pickle)
        del component
    print(format_errors(errors, tolerance))
    failed = [f"{e.component}.{e.output}" for e in errors if not e.max_rel <= tolerance]
    if failed:
        print(
            f"verification FAILED (relative error above {tolerance:g}): {', '.join(failed)}", file=sys.stderr
        )
        return 1
    print(f"verification passed: every relative error <= {tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
