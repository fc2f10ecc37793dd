"""The trainer: one file, read top to bottom.

Sections: setup (mesh, world, recipe, shardings), state (abstract first, then placed), step (one jitted
function per set of active updates), loop (data, logging, samples, checkpoints, signals), and the other modes
(sample, eval, export). The trainer is generic: it never asks which method it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from jdistill import configuration, microbatch, parallel, paths, rng
from jdistill.checkpoint import Checkpointer
from jdistill.data.pipeline import BatchPipeline, PipelineOptions
from jdistill.evaluate.image_metrics import ImageMetrics
from jdistill.evaluate.images import to_unit
from jdistill.methods import build_recipe
from jdistill.methods.recipe import Carry, Recipe, Update
from jdistill.metric_writers import MetricsLog, MetricWriters
from jdistill.nonfinite import warn_nonfinite_rows
from jdistill.sample_files import GRID, save_samples
from jdistill.teachers import World, build_world

PyTree = Any
log = logging.getLogger("jdistill")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. updates kept producing non-finite values); nothing bad was saved."""


# ================================================================================================ setup


@dataclasses.dataclass
class Setup:
    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    world: World
    recipe: Recipe
    frozen: dict[str, PyTree]  # placed frozen parameters (teacher, text encoders, ...)
    abstract_state: dict[str, PyTree]  # ShapeDtypeStructs with shardings
    batch_sharding: jax.sharding.NamedSharding
    rows: np.ndarray  # global batch rows fed by this process
    image_metrics: ImageMetrics = dataclasses.field(default_factory=ImageMetrics)  # config.eval's FID, CLIP
    sample_fn: Any = None  # the jitted sampler (draw_samples), built once per run

    @property
    def state_shardings(self) -> PyTree:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)


def setup(
    config: ml_collections.ConfigDict, workdir: str | None, *, abstract: bool = False, devices=None
) -> Setup:
    """Mesh, world, recipe, placed frozen parameters and the train state's shapes and shardings.

    ``abstract``: shapes only (``tools/plan.py``): the world is built without weights or data and the frozen
    parameters are ``jax.ShapeDtypeStruct``s with their shardings; ``devices`` may then be abstract devices of
    an accelerator this machine does not have.
    """
    mesh = parallel.make_mesh(config.mesh, devices)
    if config.batch_size % parallel.batch_divisor(mesh):
        raise configuration.ConfigError(
            f"batch_size={config.batch_size} must be divisible by the {parallel.batch_divisor(mesh)} devices "
            f"of the batch axes ({parallel.describe(mesh)})"
        )
    microbatch.check(
        config.batch_size,
        config.get("micro_batches", 1),
        parallel.batch_divisor(mesh),
        parallel.describe(mesh),
    )
    policy = parallel.ShardingPolicy.from_config(config.sharding)

    def shardings_for(name: str, net) -> PyTree:  # frozen networks load straight into these
        return policy.shardings(name, net.abstract, net.logical_axes, mesh)

    with _reported_as_setting("teacher"):
        world = build_world(config, shardings_for, abstract=abstract)
    with _reported_as_setting(f"method {config.method.name!r}"):
        recipe = build_recipe(config, world)
    frozen_shardings = {
        name: policy.shardings(name, tree, world.frozen_axes[name], mesh)
        for name, tree in world.frozen.items()
    }
    if abstract:
        frozen = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), world.frozen, frozen_shardings
        )
    else:
        frozen = jax.device_put(world.frozen, frozen_shardings)
    abstract_state = abstract_train_state(recipe, frozen, mesh, config)
    batch_sharding = parallel.batch_sharding(mesh)
    rows = parallel.local_rows(batch_sharding, config.batch_size)
    image_metrics = ImageMetrics.from_config(config.get("eval"))
    if image_metrics.enabled and not abstract:
        if world.decode is None:
            raise configuration.ConfigError(
                "eval.fid_reference / eval.clip_model score decoded images; this teacher's samples are not images"
            )
        if image_metrics.needs_prompts and world.eval_prompts is None:
            raise configuration.ConfigError(
                "eval.clip_model needs the evaluation prompts as text; this world has none (teacher.eval_prompts)"
            )
    return Setup(
        config, workdir, mesh, world, recipe, frozen, abstract_state, batch_sharding, rows, image_metrics
    )


@contextlib.contextmanager
def _reported_as_setting(what: str):
    """A plain ValueError while building the world or the recipe comes from a setting they refuse (a choice,
    a range, a missing option): it becomes a ConfigError, which the entry point reports in one line."""
    from jdistill.convert.core import ConversionError

    try:
        yield
    except (configuration.ConfigError, ConversionError):
        raise
    except ValueError as err:
        raise configuration.ConfigError(f"{what}: {err}") from err


# ================================================================================================ state
#
# The train state is a plain dict: {"params": {net: tree}, "opt": {net: optax state}, "ema": {net: tree},
# "nonfinite": {update: int32 streak}}. The step number, PRNG root and data position live on the host and
# in the checkpoint metadata.


def _init_fn(recipe: Recipe):
    def init(key: jax.Array, frozen: Mapping[str, PyTree]) -> dict[str, PyTree]:
        params, opt, ema = {}, {}, {}
        for network in recipe.networks:
            p = network.initial_params(rng.stream(key, network.name), frozen)
            params[network.name] = p
            opt[network.name] = network.optimizer.init(p)
            if network.ema_decay > 0:
                ema[network.name] = jax.tree.map(jnp.copy, p)
        nonfinite = {u.name: jnp.zeros((), jnp.int32) for u in recipe.updates}
        return {"params": params, "opt": opt, "ema": ema, "nonfinite": nonfinite}

    return init


def abstract_train_state(recipe: Recipe, frozen: PyTree, mesh, config) -> dict[str, PyTree]:
    """Shapes of the whole train state (nothing allocated), each leaf with its target sharding."""
    shapes = jax.eval_shape(_init_fn(recipe), jax.random.key(0), frozen)
    policy = parallel.ShardingPolicy.from_config(config.sharding)
    shardings: dict[str, Any] = {"params": {}, "opt": {}, "ema": {}}
    for network in recipe.networks:
        name = network.name
        ps = policy.shardings(name, shapes["params"][name], network.net.logical_axes, mesh)
        shardings["params"][name] = ps
        shardings["opt"][name] = parallel.follow_params(shapes["opt"][name], shapes["params"][name], ps, mesh)
        if name in shapes["ema"]:
            shardings["ema"][name] = ps
    shardings["nonfinite"] = jax.tree.map(lambda _: parallel.replicated(mesh), shapes["nonfinite"])
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_train_state(s: Setup, key: jax.Array) -> dict[str, PyTree]:
    """Initialise every network directly into its sharding (no full copy on one device)."""
    init = jax.jit(_init_fn(s.recipe), out_shardings=s.state_shardings)
    return init(key, s.frozen)


# ================================================================================================ step


def _all_finite(tree: PyTree) -> jax.Array:
    """True when every element of ``tree`` is finite. Computed as one global norm: per-leaf
    ``all(isfinite)`` reductions feeding ``where`` over the parameters made XLA's CPU compile of a small
    UNet step take minutes instead of seconds. A norm that overflows float32 (elements ~1e19) counts as
    non-finite, which is what such a step deserves."""
    return jnp.isfinite(optax.tree.norm(tree)) if jax.tree.leaves(tree) else jnp.bool_(True)


def _where(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def ema_update(ema: PyTree, params: PyTree, decay: float, step: jax.Array) -> PyTree:
    """EMA with the usual warm-up, decay_n = min(decay, (1 + n) / (10 + n)): early averages forget the
    random initialisation instead of being dominated by it."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)


def _prepared(prepare, frozen: PyTree, batch: dict, k: int) -> dict:
    """The step's batch prepared (token ids -> prompt embeddings, ...) inside the step's program; with
    micro-batches, one micro-batch at a time, stacked (k, ...)."""
    return microbatch.prepare_stacked(prepare, frozen, batch, k) if k > 1 else prepare(frozen, batch)


def _update_fn(update: Update, networks: Mapping[str, Any], k: int):
    """One update of a step: ``(state, frozen, batch, key, carry, step_num) -> (state, metrics, carry)``,
    ``batch`` prepared (stacked (k, rows, ...) when k > 1).

    It takes gradients of the update's loss with respect to its own networks only; everything else it reads is
    frozen for it. An update whose loss or gradients are not finite is skipped (parameters and optimizer state
    kept) and counted in ``nonfinite``.
    """

    def apply(state, frozen, batch, key, carry, step_num):
        params, opt = dict(state["params"]), dict(state["opt"])
        ema, nonfinite = dict(state["ema"]), dict(state["nonfinite"])
        update_key = rng.stream(key, update.name)
        # EMA trees are readable as "<name>_ema" (LCM's target network), never trained.
        averages = {f"{n}_ema": tree for n, tree in ema.items()}

        def loss_fn(trainable, batch, key, carry):
            return update.loss({**frozen, **params, **averages, **trainable}, batch, key, carry)

        trainable = {n: params[n] for n in update.trains}
        if k > 1:
            rows = jax.tree.leaves(batch)[0].shape[1]
            loss, aux, new_carry, grads = microbatch.accumulate(
                loss_fn, trainable, batch, update_key, carry, k, rows
            )
        else:
            (loss, (aux, new_carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, batch, update_key, carry
            )
        new_params, new_opts = {}, {}
        for n in update.trains:
            updates, new_opts[n] = networks[n].optimizer.update(grads[n], opt[n], params[n])
            new_params[n] = optax.apply_updates(params[n], updates)
        # Skip the whole update if anything it produced is not finite (loss, gradients, new parameters).
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_params)
        for n in update.trains:
            params[n] = _where(ok, new_params[n], params[n])
            opt[n] = _where(ok, new_opts[n], opt[n])
            if n in ema:
                ema[n] = ema_update(ema[n], params[n], networks[n].ema_decay, step_num)
        nonfinite[update.name] = jnp.where(ok, 0, nonfinite[update.name] + 1)
        metrics = {
            f"{update.name}/loss": loss,
            f"{update.name}/grad_norm": grad_norm,
            f"{update.name}/skipped": 1.0 - ok.astype(jnp.float32),
            **{f"{update.name}/{name}": v for name, v in aux.items()},
        }
        state = {"params": params, "opt": opt, "ema": ema, "nonfinite": nonfinite}
        return state, metrics, new_carry  # the loss's carry: its input with the fields it filled

    return apply


def make_step(recipe: Recipe, active: tuple[Update, ...], prepare, micro_batches: int = 1):
    """The pure train step for steps where the updates ``active`` run, in order (``_update_fn``).

    ``micro_batches`` > 1: each update accumulates the mean gradient of that many micro-batches before its one
    optimizer update (jdistill/microbatch.py: the carry's layout, the random keys, and why the result equals
    the full batch's in distribution, not bitwise).
    """
    networks = {n.name: n for n in recipe.networks}
    updates = [_update_fn(u, networks, micro_batches) for u in active]

    def step(state, frozen, batch, step_num, root):
        batch = _prepared(prepare, frozen, batch, micro_batches)
        key = rng.step_key(root, step_num)
        metrics, carry = {}, Carry(step=step_num)
        for apply in updates:
            state, update_metrics, carry = apply(state, frozen, batch, key, carry, step_num)
            metrics.update(update_metrics)
        return state, metrics

    return step


def make_update_programs(recipe: Recipe, active: tuple[Update, ...], prepare, micro_batches: int = 1):
    """The same step as ``make_step``, cut into one pure function per update (``split_updates``).

    Each is ``(state, frozen, inputs, step_num, root) -> (state, metrics, outputs)``: the first takes the raw
    batch and prepares it, a later one takes the previous one's outputs (the prepared batch and the carry);
    the last returns no outputs. The keys are the one-program step's, so the two agree up to rounding.
    Smaller programs: each compiles on its own (host memory and time of an XLA compile grow with the program)
    and holds only its own update's temporaries.
    """
    networks = {n.name: n for n in recipe.networks}
    k = micro_batches

    def program(index: int, update: Update):
        apply = _update_fn(update, networks, k)
        last = index == len(active) - 1

        def run(state, frozen, inputs, step_num, root):
            if index == 0:
                batch, carry = _prepared(prepare, frozen, inputs, k), Carry(step=step_num)
            else:
                batch, carry = inputs
            state, metrics, carry = apply(state, frozen, batch, rng.step_key(root, step_num), carry, step_num)
            return state, metrics, () if last else _keep_split((batch, carry), k)

        return run

    return [program(i, u) for i, u in enumerate(active)]


def _keep_split(tree: PyTree, k: int) -> PyTree:
    """Per-sample arrays passed between programs stay split over the batch axes (``transfer_shardings``)."""
    return jax.tree.map(lambda x: parallel.constrain_batch(x, dim=1 if k > 1 else 0), tree)


def transfer_shardings(mesh: jax.sharding.Mesh, tree: PyTree, k: int) -> PyTree:
    """The shardings ``_keep_split`` gives arrays of the shapes in ``tree`` under ``mesh``."""

    def one(x):
        spec = parallel.batch_spec(mesh, x.shape, dim=1 if k > 1 else 0)
        return jax.sharding.NamedSharding(mesh, spec or jax.sharding.PartitionSpec())

    return jax.tree.map(one, tree)


class UpdatePrograms:
    """A step run as one compiled program per update (``split_updates``); called like a one-program step."""

    def __init__(self, programs: list, k: int, mesh: jax.sharding.Mesh):
        self.programs, self.k, self.mesh = programs, k, mesh

    def __call__(self, state, frozen, batch, step_num, root):
        metrics, inputs = {}, batch
        for program in self.programs:
            state, update_metrics, inputs = program(state, frozen, inputs, step_num, root)
            metrics.update(update_metrics)
        return state, metrics

    def trace(self, state, frozen, batch, step_num, root) -> list:
        """(traced, lowered) of each program on abstract arguments; a later one's inputs are the earlier one's
        outputs."""
        out, inputs = [], batch
        for program in self.programs:
            traced = program.trace(state, frozen, inputs, step_num, root)
            out.append((traced, traced.lower()))
            outputs = out[-1][1].out_info[2]
            shardings = transfer_shardings(self.mesh, outputs, self.k)
            inputs = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), outputs, shardings
            )
        return out

    def lower(self, state, frozen, batch, step_num, root) -> list:
        """Each program lowered on abstract arguments (``trace``)."""
        return [lowered for _, lowered in self.trace(state, frozen, batch, step_num, root)]


class StepFunctions:
    """Compiled steps, one per distinct set of active updates (e.g. DMD2's fake-only and full steps)."""

    def __init__(self, s: Setup):
        self.s = s
        self.cache: dict[tuple[str, ...], Any] = {}

    def compiles(self, step_num: int) -> bool:
        """Whether ``step_num`` runs a step not compiled yet (its first call compiles it)."""
        return _names(self.s.recipe.active_updates(step_num)) not in self.cache

    def __call__(self, step_num: int):
        active = self.s.recipe.active_updates(step_num)
        names = _names(active)
        if names not in self.cache:
            s = self.s
            frozen_shardings = jax.tree.map(lambda x: x.sharding, s.frozen)
            replicated = parallel.replicated(s.mesh)
            prepare, k = s.recipe.prepare(s.world), s.config.get("micro_batches", 1)
            if s.config.get("split_updates", False) and len(active) > 1:
                programs = [
                    jax.jit(
                        program,
                        in_shardings=(
                            s.state_shardings,
                            frozen_shardings,
                            s.batch_sharding if i == 0 else None,  # later: as the previous one left them
                            replicated,
                            replicated,
                        ),
                        out_shardings=(s.state_shardings, replicated, None),
                        donate_argnums=(0,),
                    )
                    for i, program in enumerate(make_update_programs(s.recipe, active, prepare, k))
                ]
                self.cache[names] = UpdatePrograms(programs, k, s.mesh)
            else:
                self.cache[names] = jax.jit(
                    make_step(s.recipe, active, prepare, k),
                    in_shardings=(
                        s.state_shardings,
                        frozen_shardings,
                        s.batch_sharding,
                        replicated,
                        replicated,
                    ),
                    out_shardings=(s.state_shardings, replicated),
                    donate_argnums=(0,),
                )
        return self.cache[names]


def _names(updates: tuple[Update, ...]) -> tuple[str, ...]:
    return tuple(u.name for u in updates)


# ================================================================================================ loop


class StepClock:
    """Step timings without compilation: a step that compiles is waited for, said on the progress bar, and
    left out of the timed steps (its time is logged as ``compile_s``), so neither ``step_time_s`` nor the
    bar's remaining time counts it."""

    def __init__(self, bar: tqdm, name: str):
        self.bar, self.name = bar, name
        self.start = time.perf_counter()
        self.untimed, self.compile_s, self.compile_start = 0, 0.0, 0.0

    def compiling(self, step: int) -> None:
        self.compile_start = time.perf_counter()
        message = f"compiling the step for step {step + 1} (a minute or more on a CPU)"
        if self.bar.disable:
            log.info("%s", message)
        else:
            self.bar.set_description_str(f"{self.name}: {message}")
            self.bar.refresh()

    def compiled(self) -> None:
        now = time.perf_counter()
        self.compile_s += now - self.compile_start
        self.untimed += 1
        self.start = now
        self.bar.set_description_str(self.name)
        self.bar.unpause()  # the rate behind the remaining time starts after compilation

    def pause(self, seconds: float) -> None:
        """Keeps ``seconds`` spent outside the steps (sampling, evaluation) out of the timings and of the
        bar's rate."""
        self.start += seconds
        if seconds > 0.5:
            self.bar.unpause()

    def window_timings(self, steps: int, batch_size: int) -> dict[str, float]:
        """Timings of the ``steps`` steps since the last call (those that compiled left out, unless every
        step did), and ``compile_s`` where a step compiled."""
        now = time.perf_counter()
        timed, elapsed = steps - self.untimed, now - self.start
        if timed <= 0:
            timed, elapsed = steps, elapsed + self.compile_s
        out = {
            "steps_per_sec": timed / elapsed,
            "step_time_s": elapsed / timed,
            "images_per_sec": timed * batch_size / elapsed,
        }
        if self.compile_s:
            out["compile_s"] = self.compile_s
        self.start, self.untimed, self.compile_s = now, 0, 0.0
        return out


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits. A second SIGINT interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received signal %d: saving a checkpoint and stopping", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _mean_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(window)
    keys = sorted({k for m in host for k in m})
    return {k: float(np.mean([m[k] for m in host if k in m])) for k in keys}


def _checkpoint_items(state: dict[str, PyTree]) -> dict[str, PyTree]:
    items = {}
    for name, tree in state["params"].items():
        items[name] = tree
        items[f"{name}_opt"] = state["opt"][name]
    for name, tree in state["ema"].items():
        items[f"{name}_ema"] = tree
    return items


def _state_from_items(items: dict[str, PyTree], abstract: dict[str, PyTree], nonfinite) -> dict[str, PyTree]:
    return {
        "params": {n: items[n] for n in abstract["params"]},
        "opt": {n: items[f"{n}_opt"] for n in abstract["opt"]},
        "ema": {n: items[f"{n}_ema"] for n in abstract["ema"]},
        "nonfinite": nonfinite,
    }


def _meta(step: int, root: jax.Array, state, data_position: int | None = None) -> dict[str, Any]:
    return {
        "step": step,
        "data_position": step if data_position is None else data_position,  # the input pipeline's next batch
        "rng_key": np.asarray(jax.random.key_data(root)).tolist(),
        "nonfinite": {k: int(v) for k, v in jax.device_get(state["nonfinite"]).items()},
    }


def start_from_other_runs(s: Setup, state: dict[str, PyTree]) -> dict[str, PyTree]:
    """Networks with ``networks.<name>.init_from`` (a run directory) start from that run's latest parameters
    of the same network (e.g. DMD2's stage 2 from stage 1); their optimizer state starts fresh and their EMA
    from the loaded parameters. Only at a fresh start: a run's own checkpoint always wins."""
    state = {**state, "params": dict(state["params"]), "ema": dict(state["ema"])}
    for name in state["params"]:
        source = s.config.networks[name].get("init_from", "") if name in s.config.networks else ""
        if not source:
            continue
        directory = paths.as_path(source) / "checkpoints"
        if not directory.is_dir():
            raise configuration.ConfigError(
                f"networks.{name}.init_from={source!r}: {directory} does not exist (not a jdistill run directory?)"
            )
        other = Checkpointer(directory, every=0, keep=0)
        try:
            step, items = other.restore_some({name: s.abstract_state["params"][name]})
        finally:
            other.close()
        state["params"][name] = items[name]
        if name in state["ema"]:
            state["ema"][name] = jax.tree.map(jnp.copy, items[name])
        log.info("network %s starts from %s (step %d)", name, source, step)
    return state


def restore_or_init(s: Setup, ckpt: Checkpointer) -> tuple[int, dict[str, PyTree], jax.Array]:
    """(step, state, PRNG root): from the newest readable checkpoint, or freshly initialised."""
    return _restore_or_init(s, ckpt)[:3]


def _restore_or_init(s: Setup, ckpt: Checkpointer) -> tuple[int, dict[str, PyTree], jax.Array, int]:
    """``restore_or_init``'s (step, state, root) and the data position to resume the input pipeline at."""
    abstract_items = _checkpoint_items(s.abstract_state)
    restored = ckpt.restore(abstract_items)
    if restored is None:
        root = jax.random.key(s.config.seed)
        return 0, start_from_other_runs(s, init_train_state(s, rng.stream(root, "init"))), root, 0
    step, items, meta = restored
    root = jax.random.wrap_key_data(jnp.asarray(meta["rng_key"], jnp.uint32))
    nonfinite = {
        k: jnp.asarray(meta["nonfinite"].get(k, 0), jnp.int32) for k in s.abstract_state["nonfinite"]
    }
    nonfinite = jax.device_put(nonfinite, jax.tree.map(lambda a: a.sharding, s.abstract_state["nonfinite"]))
    log.info("resumed from checkpoint at step %d", step)
    position = int(meta.get("data_position", step))
    return step, _state_from_items(items, s.abstract_state, nonfinite), root, position


@dataclasses.dataclass
class Trained:
    """What a finished ``run_training`` holds: the final evaluation, and the run's setup and state at its last
    step, so that exporting after training reuses them instead of building the world again. ``setup`` is None
    when the run had already finished and been evaluated (nothing trained or restored this time)."""

    results: dict[str, float]
    setup: Setup | None = None
    state: dict[str, PyTree] | None = None
    step: int = 0


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (or resume) the recipe in ``config``; returns the final evaluation metrics."""
    return run_training(config, workdir).results


def run_training(config: ml_collections.ConfigDict, workdir: str) -> Trained:
    """``train``, keeping the run's setup and final state (see ``Trained``)."""
    s = setup(config, workdir)
    run = paths.as_path(workdir)  # local or remote (gs://): every file of the run goes through epath
    if parallel.is_main_process():
        (run / "samples").mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(configuration.to_json(config))
    log.info("%s", parallel.describe(s.mesh))
    for network in s.recipe.networks:
        log.info("network %s: %d parameters", network.name, network.net.num_params())

    ckpt = Checkpointer(
        run / "checkpoints",
        every=config.checkpoint.every,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    step, state, root, data_position = _restore_or_init(s, ckpt)
    writers = MetricWriters(config, workdir, step)
    recorded = recorded_final_evaluation(writers.jsonl, config.num_steps)
    if step >= config.num_steps and recorded is not None:
        log.info(
            "the run finished at step %d and was evaluated: nothing to do (--mode eval evaluates again)", step
        )
        ckpt.close()
        writers.close()
        return Trained(recorded)
    writers.text("config", configuration.to_json(config))
    steps = StepFunctions(s)
    source = s.recipe.source(s.world)
    if source is None:
        raise configuration.ConfigError(
            f"method {config.method.name!r} trains on data, but this teacher has none"
        )
    # One batch per step, read and put on the devices ahead of the step (jdistill/data/pipeline.py).
    batches = BatchPipeline(
        source,
        start=data_position,
        stop=data_position + max(config.num_steps - step, 0),
        global_size=config.batch_size,
        rows=s.rows,
        sharding=s.batch_sharding,
        options=PipelineOptions.from_config(config),
    )

    evaluation = config.get("eval", ml_collections.ConfigDict())
    eval_every = evaluation.get("every", 0)
    profile = config.get("profile", ml_collections.ConfigDict())
    profiler = Profiler(run / "profile", step + profile.get("warmup", 3), profile.get("steps", 0))
    window: list[dict[str, jax.Array]] = []
    bar = tqdm(
        total=config.num_steps,
        initial=step,
        disable=not (config.progress_bar and parallel.is_main_process()),
        dynamic_ncols=True,
        desc=config.method.name,
    )
    clock = StepClock(bar, config.method.name)
    in_flight = None
    sync_each_step = parallel.needs_step_sync(s.mesh)
    try:
        with StopSignal() as stop:
            while step < config.num_steps:
                profiler.before_step(step, state)
                batch = next(batches)
                compiling = steps.compiles(step)
                if compiling:
                    clock.compiling(step)
                with jax.set_mesh(s.mesh):  # models keep activations batch-sharded (parallel.constrain_batch)
                    state, metrics = steps(step)(state, s.frozen, batch, np.int32(step), root)
                if sync_each_step or compiling:
                    jax.block_until_ready(metrics)
                if compiling:
                    clock.compiled()
                step += 1
                window.append(metrics)
                # One step in flight: the bar counts finished steps (dispatch alone returns at once, and its
                # rate would swing the remaining time at each log step), and the device always has the next.
                if in_flight is not None:
                    jax.block_until_ready(in_flight)
                in_flight = metrics
                bar.update(1)

                if step % config.log_every == 0 or step == config.num_steps:
                    values = _mean_metrics(window)
                    values.update(clock.window_timings(len(window), config.batch_size))
                    values.update(device_memory())
                    writers.scalars(step, values)
                    if parallel.is_main_process():
                        warn_nonfinite_rows(values, step)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k.endswith("/loss")})
                    window = []
                    _check_nonfinite(state, config.max_nonfinite_streak, step)

                paused_at = time.perf_counter()  # sampling and evaluation stay out of the step timings
                if config.sample.every and step % config.sample.every == 0:
                    write_samples(s, state, f"step_{step:07d}", config.sample.count)
                    writers.image_file(step, "samples", run / "samples" / f"step_{step:07d}.png")
                if eval_every and step % eval_every == 0 and step < config.num_steps:
                    results = evaluate_during_training(s, state, step)
                    writers.scalars(step, {f"eval/{k}": v for k, v in results.items()})
                    writers.image_file(step, "eval", run / "samples" / f"eval_{step:07d}.png")
                clock.pause(time.perf_counter() - paused_at)

                # A stop request must be seen by every process at the same step; several processes agree at
                # log steps only, to keep host synchronisation off the hot path.
                stopping = False
                if jax.process_count() == 1 or step % config.log_every == 0:
                    stopping = parallel.agree(stop.received is not None)
                if ckpt.due(step) or step == config.num_steps or stopping:
                    _check_nonfinite(state, config.max_nonfinite_streak, step)
                    ckpt.save(step, _checkpoint_items(state), _meta(step, root, state, batches.position))
                if stopping:
                    ckpt.wait()
                    log.warning(
                        "stopped at step %d by signal %s; the next run resumes from here", step, stop.received
                    )
                    raise SystemExit(128 + (stop.received or signal.SIGTERM))
    finally:
        profiler.stop(state, step)
        batches.close()
        bar.close()
        ckpt.close()  # finishes saves in flight, also when an error ends the loop
        writers.flush()

    results = evaluate_final(s, state)
    writers.scalars(step, {f"eval/{k}": v for k, v in results.items()})
    writers.image_file(step, "final", run / "samples" / "final.png")
    writers.close()
    return Trained(results, s, state, step)


def recorded_final_evaluation(metrics: MetricsLog, num_steps: int) -> dict[str, float] | None:
    """The final evaluation a finished run already logged (its ``eval/`` values at ``num_steps``), if any."""
    for record in reversed(metrics.records()):
        if record.get("step") == num_steps and any(k.startswith("eval/") for k in record):
            return {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
    return None


def device_memory() -> dict[str, float]:
    """Memory in use and its peak on the busiest local device, in GiB (where the backend reports it: GPUs
    and TPUs; CPU devices report nothing)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    stats = [m for m in stats if m]
    out = {}
    for key, name in (("bytes_in_use", "memory/in_use_gib"), ("peak_bytes_in_use", "memory/peak_gib")):
        if any(key in m for m in stats):
            out[name] = max(m.get(key, 0) for m in stats) / 2**30
    return out


class Profiler:
    """A JAX profiler trace of ``steps`` steps from step ``first`` (after warm-up: compilation stays out)."""

    def __init__(self, logdir, first: int, steps: int):
        self.logdir, self.first, self.steps = str(logdir), first, steps
        self.active = False

    def before_step(self, step: int, state) -> None:
        if not self.steps:
            return
        if step == self.first:
            jax.block_until_ready(state)  # the trace starts with the device idle
            jax.profiler.start_trace(self.logdir)
            self.active = True
        elif step == self.first + self.steps:
            self.stop(state, step)

    def stop(self, state, step: int) -> None:
        """Ends the trace (if one runs) once the steps before ``step`` are done."""
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s", self.first, step - 1, self.logdir)


def _check_nonfinite(state, limit: int, step: int) -> None:
    streaks = {k: int(v) for k, v in jax.device_get(state["nonfinite"]).items()}
    bad = {k: v for k, v in streaks.items() if v >= limit}
    if bad:
        raise TrainingError(
            f"step {step}: updates {bad} produced non-finite losses or gradients {limit}+ times in a row; the "
            "parameters were not changed by those updates and no checkpoint was written from them. Lower the "
            "learning rate or check the inputs, then re-run to resume from the last checkpoint."
        )


# ================================================================================================ samples and eval


def sampling_params(s: Setup, state) -> dict[str, PyTree]:
    params = {**s.frozen, **state["params"]}
    if s.config.sample.use_ema:
        params.update({n: state["ema"][n] for n in s.recipe.sample_with if n in state["ema"]})
    return params


def draw_samples(s: Setup, state, count: int, seed: int) -> tuple[np.ndarray, dict]:
    """``count`` student samples for the world's evaluation batch, drawn in sharded chunks.

    Returns the samples and the host evaluation batch they were drawn for.
    """
    batch_all = s.world.eval_batch(count)
    chunk = s.config.sample.batch
    divisor = parallel.batch_divisor(s.mesh)
    if chunk % divisor:
        raise configuration.ConfigError(
            f"sample.batch={chunk} must be divisible by the {divisor} batch devices"
        )
    params = sampling_params(s, state)
    if s.sample_fn is None:  # one jitted function per run: every sampling and evaluation reuses its programs
        recipe, prepare = s.recipe, s.world.prepare

        def sample(params, batch, key):
            return recipe.sample(params, prepare(params, batch)["cond"], key)

        s.sample_fn = jax.jit(sample, out_shardings=s.batch_sharding)
    key = jax.random.key(seed)
    rows = parallel.local_rows(s.batch_sharding, chunk)
    out = []
    for i, start in enumerate(range(0, count, chunk)):
        part = {k: _pad_rows(v[start : start + chunk], chunk)[rows] for k, v in batch_all.items()}
        batch = parallel.global_batch(part, s.batch_sharding, chunk)
        with jax.set_mesh(s.mesh):  # as in the steps: batch-sharded activations, per-device attention kernels
            drawn = s.sample_fn(params, batch, jax.random.fold_in(key, i))
        out.append(parallel.to_host(drawn))
    return np.concatenate(out)[:count], batch_all


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    return x if len(x) == n else np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def write_samples(s: Setup, state, name: str, count: int, seed: int | None = None) -> tuple[np.ndarray, dict]:
    samples, batch = draw_samples(s, state, count, s.config.sample.seed if seed is None else seed)
    if parallel.is_main_process():
        _save(s, name, samples, batch, count)
    return samples, batch


def _save(s: Setup, name: str, samples: np.ndarray, batch: dict, count: int) -> None:
    """``samples/<name>*`` of samples drawn for the first rows of the world's evaluation batch of ``count``."""
    prompts = s.world.eval_prompts(count) if s.world.eval_prompts else None  # None: no texts (cached only)
    prompts = None if prompts is None else prompts[: len(samples)]
    save_samples(s.world, str(paths.as_path(s.workdir) / "samples" / name), samples, batch, prompts)


def score(s: Setup, samples: np.ndarray, batch: dict) -> dict[str, float]:
    """The world's metrics of ``samples`` (drawn for ``batch``), with config.eval's FID and CLIP score."""
    results = s.world.evaluate(samples, batch)
    if s.image_metrics.enabled:
        images = to_unit(s.world.decode(samples))
        prompts = s.world.eval_prompts(len(samples)) if s.image_metrics.needs_prompts else None
        results.update(s.image_metrics(images, prompts))
    return results


# Evaluations during training and the final one draw from the same noise, so their numbers follow the student
# alone; the samples of ``sample.every`` use another seed.
def _evaluation_seed(s: Setup) -> int:
    return s.config.sample.seed + 1


def evaluate_during_training(s: Setup, state, step: int) -> dict[str, float]:
    """``eval.count`` samples (default ``sample.final_count``) scored; a grid of the first 64 is written to
    ``samples/eval_<step>.png`` (the samples themselves are not kept: at real size they are large)."""
    count = s.config.eval.get("count", 0) or s.config.sample.final_count
    samples, batch = draw_samples(s, state, count, _evaluation_seed(s))
    if parallel.is_main_process():
        shown = min(GRID, len(samples))
        _save(s, f"eval_{step:07d}", samples[:shown], {k: v[:shown] for k, v in batch.items()}, count)
    results = score(s, samples, batch)
    log.info("evaluation at step %d: %s", step, _shown(results))
    return results


def evaluate_final(s: Setup, state) -> dict[str, float]:
    """Final samples with fresh noise (``samples/final*``) and the world's metrics on them."""
    samples, batch = write_samples(s, state, "final", s.config.sample.final_count, seed=_evaluation_seed(s))
    results = score(s, samples, batch)
    log.info("final evaluation: %s", _shown(results))
    return results


def _shown(results: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in results.items() if "mode_share" not in k}


# ================================================================================================ other modes


def restore_latest(config, workdir) -> tuple[Setup, dict[str, PyTree], int]:
    s = setup(config, workdir)
    ckpt = Checkpointer(paths.as_path(workdir) / "checkpoints", every=0, keep=config.checkpoint.keep)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: run --mode train first")
    step, state, _ = restore_or_init(s, ckpt)
    ckpt.close()
    return s, state, step


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    s, state, step = restore_latest(config, workdir)
    samples = paths.as_path(workdir) / "samples"
    if parallel.is_main_process():
        samples.mkdir(parents=True, exist_ok=True)
    name = f"sample_step{step:07d}"
    write_samples(s, state, name, config.sample.count)
    return str(samples / name)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    s, state, step = restore_latest(config, workdir)
    results = evaluate_final(s, state)
    MetricsLog(paths.as_path(workdir) / "metrics.jsonl", resume_step=1 << 62).write(
        step, {f"eval/{k}": v for k, v in results.items()}
    )
    return results
