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

import os
import sys
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jdistill.digits import build_record  # noqa: E402
from jdistill.teachers.presets import DIGITS_CLASSIFIER, DIGITS_ROOT, DIGITS_TEACHER  # noqa: E402


def build_world(
    out: str,
    *,
    unet_steps: int = 0,
    seed: int = 0,
    component_steps: dict[str, int] | None = None,
    sft_overrides: tuple[tuple[str, str], ...] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """Run the stages into ``out``; returns (and writes to ``out/build.json``) every stage's metrics.

    ``component_steps``: training steps of "classifier", "text_encoder", "vae" (default: their functions');
    ``sft_overrides``: more config overrides of the UNet's sft run (tests shrink it)."""
    steps = dict(component_steps or {})
    import numpy as np
    from transformers import CLIPTokenizer

    from jdistill import configuration, train
    from jdistill.digits import classifier as clf
    from jdistill.digits import components, data
    from jdistill.digits.tokenizer import write_tokenizer
    from jdistill.export import export_run

    record, save = build_record.open_record(out)

    classifier_dir = os.path.join(out, "classifier")
    if not build_record.stage_done(classifier_dir):
        t0 = time.time()
        model = clf.train_classifier(seed=seed, **build_record.stage_steps(steps, "classifier"))
        test = data.split("test")
        n_colours = len(data.COLOUR_NAMES)
        index, colours = np.repeat(test, n_colours), np.tile(np.arange(n_colours), len(test))
        acc = clf.accuracy(model, data.render(index, colours), data.digit_labels()[index], colours)
        record["classifier"] = {**acc, "seconds": round(time.time() - t0, 1)}
        model.save(classifier_dir, {"test": acc})
        save()
        log(f"classifier: {record['classifier']}")

    init_dir = os.path.join(out, "init")
    if not build_record.stage_done(init_dir):
        t0 = time.time()
        write_tokenizer(os.path.join(out, "tokenizer"))
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
        text = components.train_text_encoder(
            tokenizer, seed=seed, **build_record.stage_steps(steps, "text_encoder")
        )
        log(f"text encoder: caption accuracy {text.metrics['caption_accuracy']:.3f}")
        vae = components.train_vae(seed=seed, **build_record.stage_steps(steps, "vae"))
        log(
            f"vae: reconstruction MAE {vae.metrics['reconstruction_mae']:.2f} / 255, scale {vae.config.scaling_factor}"
        )
        components.write_pipeline(init_dir + ".tmp", text, vae, seed=seed)
        os.replace(init_dir + ".tmp", init_dir)
        record["text_encoder"] = {"caption_accuracy": text.metrics["caption_accuracy"]}
        record["vae"] = {k: vae.metrics[k] for k in ("reconstruction_mae", "latent_std")}
        record["vae"]["scaling_factor"] = vae.config.scaling_factor
        record["components_seconds"] = round(time.time() - t0, 1)
        save()

    overrides = [("teacher.path", init_dir), ("teacher.classifier", classifier_dir), ("seed", str(seed))]
    if unet_steps:
        overrides.append(("num_steps", str(unet_steps)))
    overrides += list(sft_overrides)
    config = configuration.load(os.path.join(REPO, "configs", "sft.py:digits"), overrides)
    run_dir = os.path.join(out, "sft")
    t0 = time.time()
    metrics = train.train(config, run_dir)
    record["unet"] = {
        "final": metrics,
        "steps": config.num_steps,
        "seconds_this_run": round(time.time() - t0, 1),
    }
    record["guidance_scale"] = config.method.sampler.guidance_scale  # the CFG scale of the metrics
    save()
    log(
        f"unet (sft, {config.num_steps} steps, 50 DDIM steps, CFG {config.method.sampler.guidance_scale}): {metrics}"
    )

    build_record.export_teacher(export_run, config, run_dir, out)
    return record


def install(out: str) -> str:
    """Copy ``out/teacher`` and ``out/classifier`` (and the build record) into the package's assets."""
    return build_record.install_stages(
        out, {"teacher": DIGITS_TEACHER, "classifier": DIGITS_CLASSIFIER}, DIGITS_ROOT
    )


def main(argv: list[str] | None = None) -> int:
    def build(out: str, steps: int, seed: int, log: Callable[[str], None]) -> dict:
        return build_world(out, unet_steps=steps, seed=seed, log=log)

    return build_record.build_tool(argv, __doc__, build, install, "UNet", "jdistill/assets/digits")


if __name__ == "__main__":
    sys.exit(main())
