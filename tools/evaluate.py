"""Score text-to-image outputs: a diffusers pipeline's samples, or images already drawn.

    python tools/evaluate.py --pipeline runs/digits/export --out runs/digits/eval
    python tools/evaluate.py --pipeline jdistill/assets/digits/teacher --steps 50 --guidance 4 --out eval_t50
    python tools/evaluate.py --images samples.npy --prompts prompts.txt \\
        [--fid-inception pt_inception.pth --fid-ref ref.npz] [--clip-model /models/clip-vit-large-patch14]

``--pipeline DIR`` loads DIR with ``diffusers.DiffusionPipeline.from_pretrained`` (a StableDiffusionPipeline,
or a FluxPipeline of the flow digits world at ``--resolution``, default 32; needs torch and diffusers:
``pip install -e '.[torch]'``) and draws one image per digits evaluation prompt (``--count``, balanced
over the 60 (digit, colour) pairs, the prompts jdistill's runs are scored on). Steps and guidance default to
the call an exported student records in ``jdistill_export.json``, else to the shipped teacher's (50 steps, its
build's guidance scale; a FluxPipeline: the flow digits teacher's build sampler, Euler steps with true CFG against
the empty prompt). ``--images`` (a folder or ``.npy`` (N, H, W, 3), uint8 or float in [0, 1]) with
``--prompts`` (a text file, one prompt per image, e.g. a run's ``samples/final_prompts.txt``) scores images
drawn elsewhere.

Metrics: on digits prompts (every prompt names one digit and one colour) the project's classifier gives digit,
colour and prompt accuracy, the Frechet distance in its feature space and diversity
(``jdistill.evaluate.digits``); FID with ``--fid-inception`` (pytorch-fid's weights file) and ``--fid-ref``
(statistics ``.npz`` from ``tools/fid_stats.py``); CLIP score with ``--clip-model`` (a transformers CLIP
directory). ``--out DIR`` receives ``metrics.json``, ``images.npy``, ``prompts.txt`` and a PNG grid of the
first 64 images. Nothing is downloaded.

The papers' number: zero-shot FID on COCO-2014 30k (SwiftBrush, DMD, DMD2 and SiD-LSG on SD1.5/2.1 report
it; GigaGAN's protocol, which DMD2's and SiD's evaluation code follow):

1. Prompts: 30,000 captions of the COCO-2014 validation split (40,504 images, five captions each), one caption
   from each of 30,000 images drawn with a fixed seed; write them one per line (``--prompts``).
2. Images: the student draws one image per caption at its training resolution (512 px for SD1.5/2.1) with its
   own sampler and guidance (an export's recorded call), saved losslessly (PNG or ``.npy``: JPEG shifts FID).
3. Reference statistics: the validation images themselves, centre-cropped square and resized to 256 px, through
   ``tools/fid_stats.py --images DIR --inception pt_inception.pth --out coco2014_val_256.npz``.
4. FID: the generated images centre-cropped and resized to 256 px the same way, then ``--fid-inception`` and
   ``--fid-ref coco2014_val_256.npz``. jdistill's FID is pytorch-fid's network and resize (within 1e-5 of it,
   tests/test_fid.py); clean-fid's "clean" mode, which some papers use, resizes with PIL instead, and resizing
   alone can move FID by whole points: compare numbers only under the same protocol, and note which one.
5. CLIP score: ``--clip-model`` with the papers' CLIP (ViT-G/14 from OpenCLIP for SiD-LSG, converted with
   ``jdistill.convert.clip_model``); papers print the cosine (0.30), jdistill 100 x cosine (30).

SDXL students are usually scored on a 10k subset at 1024 px (DMD2's SDXL table); FLUX and SD3 papers use other
sets (MJHQ-30K, GenEval): say which set, size and resize a number comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pipeline_class(path: str) -> str:
    """The ``_class_name`` of the pipeline directory ``path`` (its model_index.json)."""
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)["_class_name"]


def pipeline_call(path: str) -> dict:
    """The sampling call to use for a pipeline directory: an export's recorded one (with ``latents_scale``, the
    factor of its initial latents, when it is not 1), else the shipped teacher's of the same pipeline class
    (the digits UNet's 50 steps, or the flow digits teacher's build sampler: Euler steps with true CFG)."""
    record = os.path.join(path, "jdistill_export.json")
    if os.path.exists(record):
        with open(record) as f:
            info = json.load(f)
        scale = float(info.get("latents_scale", 1.0))
        return {**info["call"], **({"latents_scale": scale} if scale != 1.0 else {})}
    from jdistill.teachers.presets import DIGITS_FLUX_ROOT, DIGITS_ROOT

    if pipeline_class(path) == "FluxPipeline":
        from jdistill.convert.export_flow import teacher_call

        with open(os.path.join(DIGITS_FLUX_ROOT, "build.json")) as f:
            sampler = json.load(f)["sampler"]
        from jdistill.teachers.presets import PRESETS

        # The world's T5 was trained on short captions: FluxPipeline's default 512 padding tokens derail it.
        call = teacher_call("FluxPipeline", False, sampler["steps"], sampler["guidance_scale"])
        return {**call, "max_sequence_length": PRESETS["digits_flux"].t5_length}
    with open(os.path.join(DIGITS_ROOT, "build.json")) as f:
        return {"num_inference_steps": 50, "guidance_scale": json.load(f)["guidance_scale"]}


def draw(
    path: str, prompts: list[str], call: dict, seed: int, batch_size: int, resolution: int | None = None
) -> np.ndarray:
    """uint8 images (N, H, W, 3) from the diffusers pipeline at ``path``: a StableDiffusionPipeline (initial
    latents drawn here at the UNet's sample size, times the call's ``latents_scale``), or a transformer
    pipeline such as FluxPipeline (``DiffusionPipeline.from_pretrained``; the pipeline draws and packs its own
    latents from the seeded generator at ``resolution`` pixels, default the flow digits world's)."""
    import torch
    from diffusers import DiffusionPipeline

    say(f"loading {path}")
    # An export may carry its transformer's class as code (MeanFlow's t - r embedder): ours, written by export.
    pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    # FlowMatchEulerDiscreteScheduler's stochastic re-noising (a few-step export) draws from torch's global
    # generator, not the call's: seed it too, so an evaluation is repeatable.
    torch.manual_seed(seed)
    call = dict(call)
    scale = call.pop("latents_scale", 1.0)
    unet = getattr(pipe, "unet", None)
    if unet is None:
        if scale != 1.0:
            raise ValueError(f"latents_scale {scale} is only supported for UNet pipelines")
        if resolution is None:
            from jdistill.teachers.presets import PRESETS

            resolution = PRESETS["digits_flux"].resolution
        call.update(height=resolution, width=resolution)
    from tqdm import tqdm

    out = []
    bar = tqdm(total=len(prompts), desc=f"drawing with {type(pipe).__name__}", unit="image", file=sys.stderr)
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        if unet is not None:
            shape = (len(batch), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
            call["latents"] = scale * torch.randn(shape, generator=generator)
        else:
            call["generator"] = generator
        images = pipe(batch, output_type="np", **call).images
        out.append(np.round(np.clip(images, 0, 1) * 255).astype(np.uint8))
        bar.update(len(batch))
    bar.close()
    return np.concatenate(out)


def digits_labels(prompts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(digits, colours) when every prompt is a digits caption, else None."""
    from jdistill.digits.data import parse_caption

    try:
        pairs = np.array([parse_caption(p) for p in prompts])
    except ValueError:
        return None
    return pairs[:, 0], pairs[:, 1]


def say(message: str) -> None:
    """Progress on stderr (stdout holds the JSON record only)."""
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


def score(images: np.ndarray, prompts: list[str], args: argparse.Namespace) -> dict[str, float]:
    metrics: dict[str, float] = {}
    labels = digits_labels(prompts)
    if labels is not None:
        say(f"digits metrics of {len(images)} images")
        from jdistill.digits.classifier import load_classifier
        from jdistill.evaluate.digits import digits_metrics
        from jdistill.teachers.presets import DIGITS_CLASSIFIER

        metrics.update(digits_metrics(load_classifier(DIGITS_CLASSIFIER), images, *labels))
    if args.fid_inception:
        from jdistill.evaluate.fid import InceptionFeatures, fid

        say(f"FID of {len(images)} images against {args.fid_ref}")
        features = InceptionFeatures.from_file(args.fid_inception, batch_size=args.batch_size)
        metrics["fid"] = float(fid(images, args.fid_ref, features))
    if args.clip_model:
        from jdistill.evaluate.clip_score import CLIPScore

        say(f"CLIP score of {len(images)} images with {args.clip_model}")
        metrics["clip_score"] = float(CLIPScore.from_pretrained(args.clip_model)(images, prompts))
    return metrics


def read_prompts(path: str) -> list[str]:
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--pipeline",
        help="a diffusers pipeline directory (StableDiffusionPipeline, FluxPipeline) to draw from",
    )
    source.add_argument("--images", help="a folder of images or a .npy array (N, H, W, 3)")
    parser.add_argument("--prompts", help="with --images: a text file, one prompt per image")
    parser.add_argument("--steps", type=int, help="with --pipeline: num_inference_steps")
    parser.add_argument("--guidance", type=float, help="with --pipeline: guidance_scale")
    parser.add_argument("--resolution", type=int, help="with a FluxPipeline: image side in pixels")
    parser.add_argument("--count", type=int, default=600, help="with --pipeline: images to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--fid-inception", help="pytorch-fid's Inception weights (.pth or converted .safetensors)"
    )
    parser.add_argument("--fid-ref", help="with --fid-inception: reference statistics (.npz)")
    parser.add_argument("--clip-model", help="a transformers CLIP directory: CLIP score")
    parser.add_argument("--out", help="a directory for metrics.json, the images, prompts and a PNG grid")
    args = parser.parse_args(argv)
    if bool(args.fid_inception) != bool(args.fid_ref):
        parser.error("FID needs both --fid-inception and --fid-ref")
    if args.images and not args.prompts:
        parser.error("--images needs --prompts (one prompt per image)")
    if args.images and (args.steps or args.guidance is not None or args.resolution):
        parser.error("--steps, --guidance and --resolution apply to --pipeline only")

    if args.pipeline:
        from jdistill.digits.data import evaluation_prompts

        if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
            parser.error(f"{args.pipeline} is not a diffusers pipeline directory (no model_index.json)")
        prompts = evaluation_prompts(args.count).prompts
        call = pipeline_call(args.pipeline)
        if args.steps:
            call.pop("sigmas", None)  # an export's own times give way to the pipeline's at --steps
            call["num_inference_steps"] = args.steps
        if args.guidance is not None:
            # FluxPipeline without a guidance embedding takes CFG as true_cfg_scale against the empty prompt.
            if "true_cfg_scale" in call:
                call["true_cfg_scale"] = args.guidance
            else:
                call["guidance_scale"] = args.guidance
        images = draw(args.pipeline, prompts, call, args.seed, args.batch_size, args.resolution)
    else:
        from jdistill.evaluate.fid import read_images

        call = {}
        prompts = read_prompts(args.prompts)
        images = np.concatenate(list(read_images(args.images)))
        if len(images) != len(prompts):
            parser.error(f"{len(images)} images but {len(prompts)} prompts in {args.prompts}")
    metrics = score(images, prompts, args)
    if not metrics:
        parser.error(
            "nothing to measure: the prompts are not digits captions and no --fid-* / --clip-model given"
        )
    record = {"source": args.pipeline or args.images, **({"call": call} if call else {}), "metrics": metrics}
    print(json.dumps(record, indent=2))
    if args.out:
        from jdistill.visualize import image_grid_png

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(record, f, indent=2)
        np.save(os.path.join(args.out, "images.npy"), images)
        with open(os.path.join(args.out, "prompts.txt"), "w") as f:
            f.write("\n".join(prompts) + "\n")
        grid = images[:64].astype(np.float32) / 127.5 - 1 if images.dtype == np.uint8 else images[:64] * 2 - 1
        image_grid_png(os.path.join(args.out, "grid.png"), grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
