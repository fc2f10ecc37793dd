"""The digits benchmark: the shipped teacher at 50 / 25 / 4 / 1 DDIM steps with CFG against every recipe's
digits student, on the same 600 evaluation prompts (10 per (digit, colour)), read by the project's classifier.

    python benchmarks/digits.py --out runs/bench_digits [--recipes swiftbrush,dmd,...] [--teacher-only]

Columns: Frechet distance in the classifier's feature space (lower is better), digit / colour accuracy,
diversity (1 = as varied as the data), training time of the run (wall clock, this machine), sampling steps.
Each recipe is trained with its ``digits`` preset (``configs/<recipe>.py:<preset>``) into ``--out/<name>``;
an existing finished run is reused (its recorded training time kept), as are the teacher rows
(``--out/teacher_rows.json``, for the same count and seed). Results go to ``--out/results.json``
and a Markdown table is printed for README.md / benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name -> (config spec, other student timesteps to sample the trained student with: multi-step samplers only)
RECIPES: dict[str, tuple[str, tuple[tuple[float, ...], ...]]] = {
    "swiftbrush": ("configs/swiftbrush.py:digits", ()),
    "dmd": ("configs/dmd.py:digits", ()),
    "dmd2": ("configs/dmd2.py:digits", ()),
    "sid": ("configs/sid.py:digits", ()),
    "sid_lsg": ("configs/sid_lsg.py:digits", ()),
    "sid_4step": ("configs/sid.py:digits_4step", ()),
    "lcm": ("configs/lcm.py:digits", ((999.0,), (999.0, 499.0))),  # LCM's grid; trained for 4 steps
    "scm": ("configs/scm.py:digits", ((1.5707963267948966, 1.3),)),  # TrigFlow times; 1 step by default
    "meanflow": ("configs/meanflow.py:digits", ((1.0, 0.5), (1.0, 0.75, 0.5, 0.25))),
}
TEACHER_STEPS = (50, 25, 4, 1)
COLUMNS = ("frechet_distance", "digit_accuracy", "colour_accuracy", "diversity")


def teacher_rows(count: int, seed: int) -> list[dict]:
    import jax
    import numpy as np

    from jdistill import configuration
    from jdistill.diffusion.denoiser import predict_cfg
    from jdistill.diffusion.samplers import ode_plan, run_sampler
    from jdistill.teachers import build_world
    from jdistill.teachers.presets import DIGITS_ROOT

    with open(os.path.join(DIGITS_ROOT, "build.json")) as f:
        scale = json.load(f)["guidance_scale"]
    config = configuration.load(os.path.join(REPO, "configs", "sft.py:digits"), [])
    world = build_world(config)
    batch = world.eval_batch(count)
    cond = world.prepare(world.frozen, batch)["cond"]
    rows = []
    for steps in TEACHER_STEPS:
        plan = ode_plan(world.teacher.schedule, steps, spacing="trailing")

        @jax.jit
        def sample(cond, key, plan=plan):
            x = world.teacher.schedule.prior_sample(key, (len(jax.tree.leaves(cond)[0]), *world.sample_shape))
            return run_sampler(
                lambda x_t, t: predict_cfg(
                    world.teacher, world.frozen["teacher"], x_t, t, cond, world.uncond, scale, "uncond"
                ),
                x,
                plan,
            )

        t0 = time.time()
        samples = np.asarray(sample(cond, jax.random.key(seed)))
        seconds = time.time() - t0
        metrics = world.evaluate(samples, batch)
        rows.append({"model": f"teacher, CFG {scale}", "steps": steps, **metrics, "sample_seconds": seconds})
        print(rows[-1], flush=True)
    return rows


def recipe_rows(names: list[str], out: str) -> list[dict]:
    from jdistill import configuration, train

    rows = []
    for name in names:
        spec, other_timesteps = RECIPES[name]
        config = configuration.load(os.path.join(REPO, spec), [])
        workdir = os.path.join(out, name)
        timing = os.path.join(workdir, "benchmark_time.json")
        _check_same_config(config, workdir)
        t0 = time.time()
        metrics = train.train(config, workdir)
        if not os.path.exists(timing):
            with open(timing, "w") as f:
                json.dump({"train_seconds": time.time() - t0}, f)
        with open(timing) as f:
            seconds = json.load(f)["train_seconds"]
        model = f"{name} ({spec.split(':')[1]})"
        steps = len(config.method.student_timesteps) if "student_timesteps" in config.method else 1
        rows.append({"model": model, "steps": steps, **metrics, "train_seconds": seconds})
        print(rows[-1], flush=True)
        for timesteps in other_timesteps:  # the same student, sampled with other steps (nothing rewritten)
            override = [("method.student_timesteps", repr(tuple(float(t) for t in timesteps)))]
            s, state, _ = train.restore_latest(
                configuration.load(os.path.join(REPO, spec), override), workdir
            )
            samples, batch = train.draw_samples(s, state, config.sample.final_count, config.sample.seed + 1)
            metrics = s.world.evaluate(samples, batch)
            rows.append({"model": model, "steps": len(timesteps), **metrics, "train_seconds": seconds})
            print(rows[-1], flush=True)
    return rows


def _check_same_config(config, workdir: str) -> None:
    """A reused run must have been trained with the preset as it is now."""
    from jdistill import configuration

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = json.loads(configuration.to_json(config))
    for cosmetic in ("progress_bar",):  # settings that do not change what is trained
        old.pop(cosmetic, None)
        new.pop(cosmetic, None)
    if old != new:
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise SystemExit(
            f"{workdir} was trained with another config (sections {changed}): remove it to retrain"
        )


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | steps | Frechet distance | digit acc. | colour acc. | diversity | training |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train_time = f"{r['train_seconds'] / 60:.1f} min" if "train_seconds" in r else "-"
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['frechet_distance']:.2f} | {r['digit_accuracy']:.3f} | "
            f"{r['colour_accuracy']:.3f} | {r['diversity']:.2f} | {train_time} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--teacher-only", action="store_true")
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1235)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cached = os.path.join(args.out, "teacher_rows.json")  # the teacher rows do not change between runs
    key = {"count": args.count, "seed": args.seed, "steps": list(TEACHER_STEPS)}
    rows = None
    if os.path.exists(cached):
        with open(cached) as f:
            record = json.load(f)
        rows = record["rows"] if record["key"] == key else None
    if rows is None:
        rows = teacher_rows(args.count, args.seed)
        with open(cached, "w") as f:
            json.dump({"key": key, "rows": rows}, f, indent=2)
    if not args.teacher_only:
        rows += recipe_rows([n for n in args.recipes.split(",") if n], args.out)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
