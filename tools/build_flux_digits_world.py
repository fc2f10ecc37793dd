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

import os
import shutil
import sys
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jdistill.digits import build_record  # noqa: E402
from jdistill.teachers.presets import DIGITS_FLUX_ROOT, DIGITS_FLUX_TEACHER, DIGITS_TEACHER  # noqa: E402

ONE_STEP = 1


def sft_config(overrides: list[tuple[str, str]]):
    """``configs/sft.py:digits_flux`` with ``overrides``."""
    from jdistill import configuration

    return configuration.load(os.path.join(REPO, "configs", "sft.py:digits_flux"), overrides)


def evaluate_at(overrides: list[tuple[str, str]], run_dir: str, steps: int) -> dict[str, float]:
    """The run's final metrics (same evaluation prompts and noise as its own final evaluation) with the teacher
    sampled in ``steps`` Euler steps; nothing is written to the run."""
    from jdistill import train

    config = sft_config([*overrides, ("method.sampler.steps", str(steps))])
    s, state, _ = train.restore_latest(config, run_dir)
    samples, batch = train.draw_samples(s, state, config.sample.final_count, seed=config.sample.seed + 1)
    return s.world.evaluate(samples, batch)


def build_world(
    out: str,
    *,
    steps: int = 0,
    seed: int = 0,
    component_steps: dict[str, int] | None = None,
    sft_overrides: tuple[tuple[str, str], ...] = (),
    clip_source: str = DIGITS_TEACHER,
    vae_stats_images: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the stages into ``out``; returns (and writes to ``out/build.json``) every stage's metrics and time.

    ``steps``: the transformer's training steps (0: the sft preset's); ``component_steps``: training steps of
    "text_encoder_2" (T5) and "vae" (default: their functions'); ``sft_overrides``: more config overrides of
    the transformer's sft run (tests shrink it); ``clip_source``: the pipeline whose CLIP tokenizer and text
    encoder are reused (the shipped digits teacher); ``vae_stats_images``: images the VAE's shift and scale
    are measured on (0: all; ``components.train_vae``)."""
    from jdistill import train
    from jdistill.digits import flux_components as fc
    from jdistill.digits.components import train_vae
    from jdistill.export import export_run

    component_steps = dict(component_steps or {})
    record, save = build_record.open_record(out)

    init_dir = os.path.join(out, "init")
    if not build_record.stage_done(init_dir):
        t0 = time.time()
        t5 = fc.train_t5(
            fc.t5_tokenizer(), seed=seed, **build_record.stage_steps(component_steps, "text_encoder_2")
        )
        t5_seconds = time.time() - t0
        log(f"T5: caption accuracy {t5.metrics['caption_accuracy']:.3f} ({t5_seconds:.0f} s)")
        t0 = time.time()
        vae = train_vae(
            seed=seed,
            config=fc.VAE16_CONFIG,
            stats_images=vae_stats_images,
            **build_record.stage_steps(component_steps, "vae"),
        )
        vae_seconds = time.time() - t0
        log(
            f"vae: reconstruction MAE {vae.metrics['reconstruction_mae']:.2f} / 255, shift "
            f"{vae.config.shift_factor}, scale {vae.config.scaling_factor} ({vae_seconds:.0f} s)"
        )
        if os.path.exists(init_dir + ".tmp"):
            shutil.rmtree(init_dir + ".tmp")
        fc.write_flux_pipeline(init_dir + ".tmp", t5, vae, seed=seed, clip_source=clip_source)
        os.replace(init_dir + ".tmp", init_dir)
        record["text_encoder_2"] = {
            "caption_accuracy": t5.metrics["caption_accuracy"],
            "seconds": round(t5_seconds, 1),
        }
        record["vae"] = {k: vae.metrics[k] for k in ("reconstruction_mae", "latent_std", "latent_mean")}
        record["vae"].update(
            shift_factor=vae.config.shift_factor,
            scaling_factor=vae.config.scaling_factor,
            seconds=round(vae_seconds, 1),
        )
        save()

    overrides = [("teacher.path", init_dir), ("seed", str(seed))]
    if steps:
        overrides.append(("num_steps", str(steps)))
    overrides += list(sft_overrides)
    config = sft_config(overrides)
    run_dir = os.path.join(out, "sft")
    sampler = config.method.sampler
    before = record.get("transformer", {})
    t0 = time.time()
    metrics = train.train(config, run_dir)
    seconds = round(time.time() - t0, 1)
    record["transformer"] = {
        "final": metrics,
        "steps": config.num_steps,
        "seconds_this_run": seconds,
        # The run that reached these steps (running the tool again on a finished run only re-evaluates it).
        "seconds_training": before.get("seconds_training", before.get("seconds_this_run"))
        if before.get("steps") == config.num_steps
        else seconds,
    }
    # The metrics' sampler: FluxPipeline's Euler steps, true CFG against the empty prompt.
    record["sampler"] = {"steps": sampler.steps, "guidance_scale": sampler.guidance_scale}
    save()
    log(
        f"transformer (sft, {config.num_steps} steps; {sampler.steps} Euler steps, CFG {sampler.guidance_scale}): {metrics}"
    )

    done = record.get("one_step", {})
    if (done.get("steps_trained"), done.get("guidance_scale")) != (config.num_steps, sampler.guidance_scale):
        t0 = time.time()
        one = evaluate_at(overrides, run_dir, ONE_STEP)
        record["one_step"] = {
            "final": one,
            "steps_trained": config.num_steps,
            "guidance_scale": sampler.guidance_scale,
            "seconds": round(time.time() - t0, 1),
        }
        save()
        log(f"transformer at one Euler step: {one}")

    build_record.export_teacher(export_run, config, run_dir, out)
    return record


def install(out: str) -> str:
    """Copy ``out/teacher`` (and the build record) into the package's assets."""
    return build_record.install_stages(out, {"teacher": DIGITS_FLUX_TEACHER}, DIGITS_FLUX_ROOT)


def main(argv: list[str] | None = None) -> int:
    def build(out: str, steps: int, seed: int, log: Callable[[str], None]) -> dict:
        return build_world(out, steps=steps, seed=seed, log=log)

    return build_record.build_tool(
        argv, __doc__, build, install, "transformer", "jdistill/assets/digits_flux"
    )


if __name__ == "__main__":
    sys.exit(main())
