"""The build record of a miniature world's build (``tools/build_digits_world.py``,
``tools/build_flux_digits_world.py``): which stages are done, and their metrics in ``build.json``, so that an
interrupted build resumes without redoing or forgetting a stage."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any


def stage_done(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def open_record(out: str) -> tuple[dict, Callable[[], None]]:
    """(the build record in ``out/build.json``, empty when new; a function that writes it back), so a resumed
    build keeps the metrics of the stages it does not redo."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "build.json")
    record: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)

    def save() -> None:
        with open(path, "w") as f:
            json.dump(record, f, indent=2)

    return record, save


def stage_steps(steps: dict[str, int], stage: str) -> dict[str, int]:
    return {"steps": steps[stage]} if stage in steps else {}


def install_stages(out: str, stages: Mapping[str, str], root: str) -> str:
    """Copies each finished stage ``out/<name>`` over its packaged copy ``stages[name]`` and the build record
    into ``root``; returns ``root``."""
    for name, dst in stages.items():
        src = os.path.join(out, name)
        if not stage_done(src):
            raise FileNotFoundError(f"{src} is missing: run the build first")
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    shutil.copy(os.path.join(out, "build.json"), os.path.join(root, "build.json"))
    return root


def build_tool(
    argv: list[str] | None,
    doc: str,
    build: Callable[[str, int, int, Callable[[str], None]], dict],
    install: Callable[[str], str],
    trained: str,
    assets: str,
) -> int:
    """A build tool's command line: ``--out DIR [--steps N] [--seed S] [--install]``; ``build(out, steps,
    seed, log)`` returns the build record, printed; ``install(out)`` copies the result into ``assets``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="build directory (resumable)")
    parser.add_argument(
        "--steps", type=int, default=0, help=f"{trained} training steps (0: the sft preset's)"
    )
    parser.add_argument("--install", action="store_true", help=f"copy the result into {assets}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    record = build(args.out, args.steps, args.seed, lambda message: print(message, flush=True))
    print(json.dumps(record, indent=2))
    if args.install:
        print(f"installed into {install(args.out)}")
    return 0


def export_teacher(export_run: Callable[[Any, str, str], Any], config: Any, run_dir: str, out: str) -> None:
    """The build's last stage: the trained run ``run_dir`` exported afresh to ``out/teacher`` by ``export_run``
    (jdistill.export's, passed in: this package does not import the trainer), without the export's record of
    where it came from (this build's paths): the shipped teacher is its own source."""
    teacher_dir = os.path.join(out, "teacher")
    if os.path.exists(teacher_dir):
        shutil.rmtree(teacher_dir)
    export_run(config, run_dir, teacher_dir)
    os.remove(os.path.join(teacher_dir, "jdistill_export.json"))
