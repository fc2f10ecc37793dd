"""FID statistics of an image set, or a one-time conversion of pytorch-fid's Inception weights.

    python tools/fid_stats.py --inception pt_inception-2015-12-05-6726825d.pth --images DIR_OR_.npy \\
        --out stats.npz [--batch-size 50] [--ref ref_stats.npz]
    python tools/fid_stats.py --inception pt_inception-2015-12-05-6726825d.pth --to fid_inception.safetensors

The first form writes (mu, sigma) of the images' pool3 features as pytorch-fid's ``.npz`` (arrays ``mu`` and
``sigma``), with the protocol of ``jdistill.evaluate.fid``; with ``--ref`` it also prints the FID against those
reference statistics. The second validates the weights and writes them as safetensors (later runs then need
neither torch nor pickle). ``--inception`` takes the ``.pth`` (needs torch) or a converted ``.safetensors``;
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--inception", required=True, help="pytorch-fid's .pth or a converted .safetensors")
    parser.add_argument("--to", default=None, help="convert --inception to this .safetensors file and stop")
    parser.add_argument("--images", default=None, help="a folder of images or a .npy array (N, H, W, 3)")
    parser.add_argument("--out", default=None, help="where to write the statistics (.npz)")
    parser.add_argument("--ref", default=None, help="reference statistics (.npz): also print the FID")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args(argv)
    if args.to is None and (args.images is None or args.out is None):
        parser.error("give --images and --out (statistics), or --to (conversion)")

    from jdistill.convert.core import ConversionError

    try:
        if args.to is not None:
            from jdistill.convert.inception import convert_to_safetensors

            count = convert_to_safetensors(args.inception, args.to)
            print(f"wrote {count} tensors to {args.to}")
            return 0

        from jdistill.evaluate.fid import (
            InceptionFeatures,
            frechet_distance,
            load_statistics,
            read_images,
            save_statistics,
            statistics,
        )

        # Inputs checked before the network is loaded and compiled.
        images = read_images(args.images)
        ref = load_statistics(args.ref) if args.ref else None
        features = InceptionFeatures.from_file(args.inception, batch_size=args.batch_size)
        feats = features(images)
        stats = statistics(feats)
        save_statistics(args.out, stats)
        print(f"wrote statistics of {len(feats)} images to {args.out}")
        if ref is not None:
            print(f"FID against {args.ref}: {frechet_distance(*stats, *ref):.4f}")
    except (ConversionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
