"""Where a run's metrics go: ``metrics.jsonl`` always, TensorBoard event files and Weights & Biases when asked.

``metrics.jsonl`` (one JSON object per logged step) is the record tools and tests read. TensorBoard event files
(``<workdir>/tensorboard``, written with tensorboardX: no TensorFlow needed) carry the same scalars, the sample
grids as images and the config as text, for ``tensorboard --logdir <workdir>``. W&B (``logging.wandb``) gets the
same when the ``wandb`` package is installed. Only the main process writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jdistill import parallel, paths

log = logging.getLogger("jdistill")


def jsonable(value: Any) -> Any:
    """A metric as JSON: scalars as floats, arrays as lists, non-finite scalars as null."""
    v = float(value) if np.ndim(value) == 0 else np.asarray(value).tolist()
    return None if isinstance(v, float) and not np.isfinite(v) else v


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step (main process only).

    Local files are appended to; a remote one (``gs://``: objects cannot be appended to) is rewritten whole.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int):
        self.path = paths.as_path(path)
        self.enabled = parallel.is_main_process()
        self.append = not paths.is_remote(path)
        self.lines: list[str] = []
        if self.enabled and self.path.exists():
            # Drop entries of steps that a resumed run redoes.
            lines = self.path.read_text().splitlines(keepends=True)
            self.lines = [
                line for line in lines if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(self.lines))

    def records(self) -> list[dict]:
        """The entries written so far (the kept ones of a resumed run included)."""
        if not self.enabled or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **{k: jsonable(v) for k, v in values.items()}}) + "\n"
        if self.append:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))


def _scalar(value: Any) -> float | None:
    if np.ndim(value) != 0:
        return None
    v = float(value)
    return v if np.isfinite(v) else None


class TensorBoardWriter:
    """Scalars, images and text in TensorBoard event files under ``logdir``.

    A remote ``logdir`` (``gs://``...) is written through a local staging folder that each ``flush`` copies
    there (etils.epath, as every file of a run): tensorboardX itself reaches only local folders and S3/GCS with
    their own client libraries."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self.mirror = logdir if paths.is_remote(logdir) else None
        self.local = tempfile.mkdtemp(prefix="jdistill_tensorboard_") if self.mirror else logdir
        self.writer = SummaryWriter(self.local, flush_secs=30)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if (v := _scalar(value)) is not None:
                self.writer.add_scalar(key, v, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def text(self, tag: str, text: str) -> None:
        # TensorBoard renders text as markdown: a code block keeps the JSON's layout.
        self.writer.add_text(tag, "```\n" + text + "\n```", 0)

    def flush(self) -> None:
        self.writer.flush()
        if self.mirror:
            paths.copy_tree(self.local, self.mirror)

    def close(self) -> None:
        self.writer.close()
        if self.mirror:
            paths.copy_tree(self.local, self.mirror)
            shutil.rmtree(self.local, ignore_errors=True)


class WandbWriter:
    """The same metrics in a Weights & Biases run (resumed under the workdir's id)."""

    def __init__(self, workdir: str, project: str, config: Mapping[str, Any]):
        import wandb

        self.wandb = wandb
        run_id = "jdistill-" + "".join(c if c.isalnum() else "-" for c in os.path.abspath(workdir))[-100:]
        self.run = wandb.init(project=project or None, id=run_id, resume="allow", config=dict(config))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        self.run.log(
            {k: v for k, v in ((k, _scalar(v)) for k, v in values.items()) if v is not None}, step=step
        )

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def text(self, tag: str, text: str) -> None:
        self.run.summary[tag] = text

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MetricWriters:
    """A run's metric sinks: ``metrics.jsonl`` plus the optional ones ``config.logging`` asks for."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, resume_step: int):
        run = paths.as_path(workdir)
        self.jsonl = MetricsLog(run / "metrics.jsonl", resume_step)
        self.sinks: list[TensorBoardWriter | WandbWriter] = []
        if not parallel.is_main_process():
            return
        settings = config.get("logging", ml_collections.ConfigDict())
        if settings.get("tensorboard", True):
            self.sinks.append(TensorBoardWriter(str(run / "tensorboard")))
        if settings.get("wandb", False):
            try:
                self.sinks.append(WandbWriter(workdir, settings.get("wandb_project", ""), config.to_dict()))
            except ImportError:
                log.warning("logging.wandb is set but the wandb package is not installed: pip install wandb")

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        self.jsonl.write(step, values)
        for sink in self.sinks:
            sink.scalars(step, values)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image (a sample grid) in the sinks that show images."""
        for sink in self.sinks:
            sink.image(step, tag, image)

    def image_file(self, step: int, tag: str, path: str | os.PathLike) -> None:
        """A PNG the run wrote (e.g. ``samples/step_0001000.png``), if it exists."""
        if not self.sinks or not paths.as_path(path).exists():
            return
        from PIL import Image

        with paths.as_path(path).open("rb") as f, Image.open(f) as img:
            self.image(step, tag, np.asarray(img.convert("RGB")))

    def text(self, tag: str, text: str) -> None:
        for sink in self.sinks:
            sink.text(tag, text)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
