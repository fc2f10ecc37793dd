"""Trace and compile time of each distinct train step of a recipe (one per set of active updates).

    python benchmarks/compile_step.py --config tests/configs/tiny_unet.py:sd \
        --config.teacher.path=DIR --config.teacher.prompts=FILE

(a tiny pipeline directory comes from ``tests/tiny_pipeline.py``: ``save_sd_pipeline(path)``). Compiles
without the persistent cache, so the numbers are cold compiles. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from jdistill import configuration, parallel, train


def main(argv: list[str]) -> None:
    spec, overrides, _ = configuration.split_config_args(argv)
    config = configuration.load(spec, overrides)
    s = train.setup(config, "/tmp/jdistill-bench")
    root = jax.random.key(0)
    state = train.init_train_state(s, root)
    source = s.recipe.source(s.world)
    batch = parallel.global_batch(
        source.local_batch(0, config.batch_size, s.rows), s.batch_sharding, config.batch_size
    )
    seen = set()
    for step in range(max(u.every for u in s.recipe.updates)):
        active = s.recipe.active_updates(step)
        names = tuple(u.name for u in active)
        if names in seen:
            continue
        seen.add(names)
        fn = jax.jit(train.make_step(s.recipe, active, s.world.prepare))
        t0 = time.perf_counter()
        lowered = fn.lower(state, s.frozen, batch, np.int32(step), root)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        print(f"{'+'.join(names):<28} trace+lower {t1 - t0:6.1f} s   compile {t2 - t1:6.1f} s", flush=True)


if __name__ == "__main__":
    jax.config.update("jax_enable_compilation_cache", False)
    main(sys.argv[1:])
