"""Entry point: ``python -m jdistill.main --config configs/<recipe>.py[:<preset>] --workdir DIR [--config.a.b=v]``.

Kept short on purpose: all logic lives in importable, tested modules (train.py, configuration.py).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from jdistill import configuration, parallel, paths

MODES = ("train", "sample", "eval", "export")
flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics.jsonl, checkpoints/, samples/).")
flags.DEFINE_enum("mode", "train", MODES, "What to do with the run directory.")
FLAGS = flags.FLAGS

_CONFIG: dict = {}


def _parse(argv: list[str]) -> list[str]:
    try:
        spec, overrides, rest = configuration.split_config_args(argv[1:])
        if spec is None:
            raise configuration.ConfigError("--config=path/to/recipe.py[:preset] is required")
        _CONFIG["spec"], _CONFIG["overrides"] = spec, overrides
        return FLAGS(argv[:1] + rest)
    except (configuration.ConfigError, flags.Error) as err:
        sys.exit(f"error: {err}")


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not FLAGS.workdir:
        sys.exit("error: --workdir is required")
    try:
        config = configuration.load(_CONFIG["spec"], _CONFIG["overrides"])
    except configuration.ConfigError as err:
        sys.exit(f"config error: {err}")
    parallel.initialize_distributed(config.distributed)
    paths.as_path(FLAGS.workdir).mkdir(parents=True, exist_ok=True)  # local or gs://

    from jdistill import train  # after distributed start-up: importing models touches no devices, but be safe

    try:
        if FLAGS.mode == "train":
            train.train(config, FLAGS.workdir)
            if config.export_when_done:
                _export_once(config, FLAGS.workdir)
        elif FLAGS.mode == "sample":
            print(train.sample(config, FLAGS.workdir))
        elif FLAGS.mode == "eval":
            print(train.evaluate(config, FLAGS.workdir))
        else:
            from jdistill.export import export_run

            print(export_run(config, FLAGS.workdir))
    except (configuration.ConfigError, train.TrainingError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


def _export_once(config, workdir: str) -> None:
    from jdistill.export import export_run

    dst = str(paths.as_path(workdir) / "export")
    if paths.is_nonempty_dir(dst):
        print(
            f"{dst} already holds an export of this run; not written again (tools/export_diffusers.py --dst DIR writes another)"
        )
        return
    print(export_run(config, workdir, dst))


def run() -> None:
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run()
