"""The build record of a miniature world's build (``tools/build_digits_world.py``,
``tools/build_flux_digits_world.py``): which stages are done, and their metrics in ``build.json``, so that an
interrupted build resumes without redoing or forgetting a stage."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


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
