"""Entry point: ``python -m jdistill.main --config configs/<recipe>.py[:<preset>] --workdir DIR [--config.a.b=v]``.

Modes (``--mode``): train (default; resumes from the newest checkpoint in DIR), sample, eval, export.

A bad input (config file, preset or key, mesh, teacher path, prompts, run directory, checkpoint) stops the
run with one line on stderr, ``jdistill: error: <what is wrong and what to do>``, and exit status 2. Set
JDISTILL_TRACEBACK=1 to see the traceback of such an error as well. Any other exception is a bug and shows its
traceback.

Kept short on purpose: all logic lives in importable, tested modules (train.py, configuration.py, preflight.py).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import NoReturn

from absl import app, flags

from jdistill import configuration, parallel, paths, preflight

MODES = ("train", "sample", "eval", "export")
TRACEBACK_ENV = "JDISTILL_TRACEBACK"
USAGE_STATUS = 2  # as argparse: the command line or its inputs are wrong
flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics.jsonl, checkpoints/, samples/).")
flags.DEFINE_enum("mode", "train", MODES, "What to do with the run directory.")
flags.DEFINE_bool(
    "profile",
    False,
    "Train: write a JAX profiler trace of a few steps after warm-up to DIR/profile "
    "(profile.steps, 5 unless the config sets it; profile.warmup steps first).",
)
PROFILE_STEPS = 5  # --profile's trace length when the config sets none
FLAGS = flags.FLAGS

_CONFIG: dict = {}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that report a bad input, not a bug: their message says what to fix."""
    from jdistill.checkpoint import CheckpointError
    from jdistill.convert.core import ConversionError
    from jdistill.train import TrainingError

    return (
        configuration.ConfigError,
        ConversionError,
        CheckpointError,
        parallel.ShardingError,
        TrainingError,
        flags.Error,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
    )


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a multi-line message's lines joined)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text or type(err).__name__


def fail(err: BaseException) -> NoReturn:
    """Stop with one line on stderr (and the traceback too when JDISTILL_TRACEBACK is set)."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exception(err)
    print(f"jdistill: error: {one_line(err)}", file=sys.stderr, flush=True)
    sys.exit(USAGE_STATUS)


def _parse(argv: list[str]) -> list[str]:
    try:
        spec, overrides, rest = configuration.split_config_args(argv[1:])
        if spec is None:
            raise configuration.ConfigError("--config=path/to/recipe.py[:preset] is required")
        _CONFIG["spec"], _CONFIG["overrides"] = spec, overrides
        return FLAGS(argv[:1] + rest)
    except (configuration.ConfigError, flags.Error) as err:
        fail(err)


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    created: str | None = None  # the outermost folder this run creates for its --workdir
    try:
        if not FLAGS.workdir:
            raise configuration.ConfigError("--workdir=DIR is required: the run directory to write or read")
        created = preflight.missing_root(FLAGS.workdir) if FLAGS.mode == "train" else None
        config = configuration.load(_CONFIG["spec"], _CONFIG["overrides"])
        if FLAGS.profile and not config.profile.steps:
            config.profile.steps = PROFILE_STEPS
        parallel.initialize_distributed(config.distributed)
        # Cheap checks of the inputs a user names (run directory, mesh, teacher, prompts) before anything loads.
        preflight.check(config, FLAGS.workdir, FLAGS.mode)

        # After distributed start-up: importing models touches no devices, but be safe.
        from jdistill import train

        if FLAGS.mode == "train":
            trained = train.run_training(config, FLAGS.workdir)
            if config.export_when_done:
                _export_once(config, FLAGS.workdir, trained)
        elif FLAGS.mode == "sample":
            print(train.sample(config, FLAGS.workdir))
        elif FLAGS.mode == "eval":
            print(train.evaluate(config, FLAGS.workdir))
        else:
            from jdistill.export import export_run

            print(export_run(config, FLAGS.workdir))
    except user_errors() as err:
        _discard_if_created(created)
        fail(err)
    except BaseException:
        _discard_if_created(created)
        raise


def _discard_if_created(created: str | None) -> None:
    """A failed run leaves no empty run directory behind (one it created, with no checkpoint or logged step);
    silently, so that a bad input's error stays the one line on stderr."""
    if created is not None and parallel.is_main_process():
        preflight.discard_empty_run(FLAGS.workdir, created)


def _export_once(config, workdir: str, trained) -> None:
    from jdistill.export import export_run

    dst = str(paths.as_path(workdir) / "export")
    if paths.is_nonempty_dir(dst):
        print(
            f"{dst} already holds an export of this run; not written again (tools/export_diffusers.py --dst DIR writes another)"
        )
        return
    print(export_run(config, workdir, dst, trained=trained))  # the trained world and state, not built again


def run() -> None:
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run()
