"""Plans: what a recipe's train step costs at real size, worked out without weights or accelerators.

``plan(config, devices)`` builds the run abstractly (``train.setup(abstract=True)``: shapes only), then

- per network (trained and frozen): parameter count, bytes, bytes per device and the fraction left
  replicated under the mesh;
- per device: the trained state (parameters, optimizer state, EMA) and the frozen parameters;
- per distinct train step (one per set of active updates, e.g. DMD2's generator + fake-score step and its
  fake-score-only steps): FLOPs from XLA's cost analysis of the lowered step (the whole step, all devices
  together), beside an analytic count from the recipe's declared passes (``methods.recipe.Pass``) and the
  networks' hand-counted forward FLOPs (``jdistill.flops``);
- with ``compile``: the compiled step's memory analysis per device (arguments, outputs, temporaries, peak),
  and whether it fits the device.

Devices may be abstract (a TPU topology this machine does not have): lowering needs no device memory, and
a deviceless compile for TPU gives the memory figures. XLA's cost analysis counts a loop body once: every
``lax.scan`` of the step (the micro-batch scan, the scanned layer stacks of the FLUX / SD3 transformers and
T5, their JVP and backward scans) is scaled back to its length from the traced program (``loop_flops``),
while a few-step student's backward simulation (``lax.fori_loop`` over a random number of steps: a while
loop) is counted as one student forward where the analytic count has the expected (K - 1) / 2.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import ml_collections
import numpy as np

from jdistill import flops as hand
from jdistill import parallel, train
from jdistill.data.joint import SEPARATOR
from jdistill.methods.recipe import Pass, Update
from jdistill.models.clip import CLIPTextConfig
from jdistill.models.flux import FluxConfig
from jdistill.models.lora import LoRANet
from jdistill.models.sd3 import SD3Config
from jdistill.models.t5 import T5Config
from jdistill.models.unet import UNetConfig
from jdistill.models.vae import AutoencoderKLConfig
from jdistill.teachers.prompts import IDS

PyTree = Any
GRAD_FACTOR = {"none": 1.0, "input": 2.0, "params": 3.0, "jvp": 2.0}


def _bytes_per_device(tree: PyTree) -> int:
    return sum(
        math.prod(x.sharding.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def abstract_batch(s: train.Setup, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of a global batch of the step's source (one row is drawn to learn them)."""
    row = s.recipe.source(s.world).local_batch(0, 1, np.arange(1))
    return {
        k: jax.ShapeDtypeStruct(
            (batch_size, *np.shape(v)[1:]), np.asarray(v).dtype, sharding=s.batch_sharding
        )
        for k, v in row.items()
    }


def step_kinds(updates: tuple[Update, ...]) -> list[tuple[tuple[Update, ...], float]]:
    """Each distinct set of active updates with the fraction of steps it runs on."""
    cycle = math.lcm(*(u.every for u in updates)) if updates else 1
    counts = Counter(tuple(u for u in updates if u.active(step)) for step in range(cycle))
    return [(active, n / cycle) for active, n in counts.items() if active]


# ------------------------------------------------------------------------------------------------ analytic


class Analytic:
    """Forward FLOPs per sample of the run's networks, from their configurations (None: not countable)."""

    def __init__(self, s: train.Setup):
        self.s = s
        self.nets = {**s.world.nets, **{n.name: n.net for n in s.recipe.networks}}
        h, w = s.world.sample_shape[:2] if len(s.world.sample_shape) == 3 else (0, 0)
        self.latent = (h, w)
        uncond = s.world.uncond
        ehs = uncond.get("encoder_hidden_states") if isinstance(uncond, dict) else None
        self.context = int(np.shape(ehs)[-2]) if ehs is not None else 77

    def config(self, name: str):
        net = self.nets.get(name)
        return getattr(net.base if isinstance(net, LoRANet) else net, "config", None)

    def unet(self, name: str) -> UNetConfig | None:
        cfg = self.config(name)
        return cfg if isinstance(cfg, UNetConfig) else None

    def forward(self, name: str, trunk: bool = False) -> float | None:
        """One sample through network ``name`` (a UNet, or a FLUX / SD3 transformer on the world's latents
        and conditioning length); None where not countable (a transformer's trunk)."""
        cfg = self.config(name)
        h, w = self.latent
        if isinstance(cfg, UNetConfig):
            return hand.unet_forward(cfg, h, w, self.context, trunk=trunk)
        if isinstance(cfg, FluxConfig) and not trunk:
            return hand.flux_forward(cfg, (h // 2) * (w // 2), self.context)  # 2x2-packed latent tokens
        if isinstance(cfg, SD3Config) and not trunk:
            return hand.sd3_forward(cfg, h, w, self.context)
        return None

    def pass_flops(self, p: Pass) -> float | None:
        forward = self.forward(p.network, p.trunk)
        if forward is None:
            return None
        factor = GRAD_FACTOR[p.grad]
        if isinstance(self.nets[p.network], LoRANet) and p.grad == "params":
            cfg = self.unet(p.network)
            if cfg is None:  # adapted projections of a transformer: not counted yet
                return None
            # Frozen kernels need no weight gradient; the adapted ones do (W + s A B is differentiated).
            adapted = hand.unet_forward(cfg, *self.latent, self.context, projections_only=True, trunk=p.trunk)
            factor = 2.0 + adapted / forward
        return p.samples * factor * forward

    def prepare_flops(self, batch: dict[str, jax.ShapeDtypeStruct]) -> float | None:
        """The step's input preparation: text encoders (CLIP, T5) on token ids, the VAE encoder on images."""
        total = 0.0
        for key, spec in batch.items():
            leaf = key.rsplit(SEPARATOR, 1)[-1]
            n = spec.shape[0]
            if leaf.startswith(IDS):
                cfg = self.nets[leaf[len(IDS) :]].config
                if isinstance(cfg, CLIPTextConfig):
                    total += n * hand.clip_text_forward(cfg, spec.shape[1])
                elif isinstance(cfg, T5Config):
                    total += n * hand.t5_encoder_forward(cfg, spec.shape[1])
                else:
                    return None
            elif leaf == "images":
                cfg = self.nets["vae"].config
                if not isinstance(cfg, AutoencoderKLConfig):
                    return None
                total += n * hand.vae_encode(cfg, spec.shape[1], spec.shape[2])
        return total

    def step(self, active: tuple[Update, ...], batch: dict, batch_size: int) -> float | None:
        if any(not u.passes for u in active):
            return None
        carried: set[str] = set()
        total = self.prepare_flops(batch)
        if total is None:
            return None
        for u in active:
            for p in u.passes:
                if p.unless_carried and p.unless_carried in carried:
                    continue
                f = self.pass_flops(p)
                if f is None:
                    return None
                total += batch_size * f
            carried.update(u.carries)
        return total


# ------------------------------------------------------------------------------------------------ plan


def _memory(compiled, platform: str) -> dict[str, int]:
    """Bytes per device. ``peak``: the TPU compiler's own peak (buffer lifetimes included); elsewhere the
    sum of arguments, outputs not aliased to them, and temporaries (the CPU's peak figure leaves out
    arguments)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    out["peak"] = peak if platform == "tpu" and peak else out["total"]
    return out


def plan(
    config: ml_collections.ConfigDict,
    devices=None,
    *,
    compile: bool = False,
    device_memory: int | None = None,
    full_step_only: bool = False,
    log=print,
) -> dict[str, Any]:
    """The plan of ``config``'s train step on ``devices`` (default: this machine's) as a JSON-able dict;
    ``full_step_only``: only the step with the most updates (one compile instead of one per kind)."""
    start = time.perf_counter()
    s = train.setup(config, None, abstract=True, devices=devices)
    mesh = s.mesh
    networks: dict[str, Any] = {}
    for network in s.recipe.networks:
        params = s.abstract_state["params"][network.name]
        networks[network.name] = {
            "trained": True,
            **parallel.sharding_report(network.name, params, s.state_shardings["params"][network.name]),
        }
    for name, tree in s.frozen.items():
        networks[name] = {
            "trained": False,
            **parallel.sharding_report(name, tree, jax.tree.map(lambda x: x.sharding, tree)),
        }
    state_bytes = _bytes_per_device(s.abstract_state)
    frozen_bytes = _bytes_per_device(s.frozen)
    log(f"built abstractly in {time.perf_counter() - start:.1f} s: {parallel.describe(mesh)}")

    batch = abstract_batch(s, config.batch_size)
    replicated = parallel.replicated(mesh)
    step_spec = jax.ShapeDtypeStruct((), np.int32, sharding=replicated)
    key_spec = jax.eval_shape(lambda: jax.random.key(0))
    key_spec = jax.ShapeDtypeStruct(key_spec.shape, key_spec.dtype, sharding=replicated)
    analytic = Analytic(s)
    functions = train.StepFunctions(s)
    steps = []
    # XLA counts a loop body once: the scans' other iterations are added from the traced programs.
    micro = config.get("micro_batches", 1)
    kinds = step_kinds(s.recipe.updates)
    if full_step_only:
        kinds = [max(kinds, key=lambda kind: len(kind[0]))]
    for active, fraction in kinds:
        step_num = next(i for i in range(10**6) if s.recipe.active_updates(i) == active)
        entry: dict[str, Any] = {"updates": [u.name for u in active], "fraction": fraction}
        t0 = time.perf_counter()
        args = (s.abstract_state, s.frozen, batch, step_spec, key_spec)
        with jax.set_mesh(mesh):
            traced = traced_programs(functions(step_num), args)
            entry["lower_s"] = round(time.perf_counter() - t0, 1)
            loops = [loop_flops(jaxpr) for jaxpr, _ in traced]
        entry["analytic_flops"] = analytic.step(active, batch, config.batch_size)
        # A split step (split_updates) is one program per update: FLOPs add up, memory is the largest program's.
        programs = [
            _program(lowered, extra, mesh, compile) for (_, lowered), extra in zip(traced, loops, strict=True)
        ]
        flops = [p["flops"] for p in programs]
        entry["flops"] = None if None in flops else sum(flops)
        if compile:
            entry["compile_s"] = round(sum(p["compile_s"] for p in programs), 1)
            entry["memory"] = max((p["memory"] for p in programs), key=lambda m: m.get("peak", 0))
        if len(programs) > 1:
            entry["programs"] = [{"updates": [u.name], **p} for u, p in zip(active, programs, strict=True)]
        log(
            f"step {'+'.join(entry['updates'])}: lowered in {entry['lower_s']} s, "
            f"{_fmt(entry['flops'])} FLOPs (analytic {_fmt(entry['analytic_flops'])})"
            + (f", compiled in {entry['compile_s']} s" if compile else "")
        )
        steps.append(entry)
    full = max(steps, key=lambda e: (len(e["updates"]), e["flops"] or 0))
    peak = max((e["memory"]["peak"] for e in steps if e.get("memory")), default=None)
    fits = None if peak is None or device_memory is None else bool(peak <= device_memory)
    advice = None
    if fits is False:
        rows = config.batch_size // math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)
        trained = _bytes_per_device(s.abstract_state["params"])
        worst = max((e["memory"] for e in steps if e.get("memory")), key=lambda m: m["peak"])
        advice = micro_batch_advice(worst, rows, micro, trained, device_memory)
    return {
        "config": config.get("name", None) or config.method.name,
        "method": config.method.name,
        "teacher": config.teacher.get("preset", config.teacher.kind),
        "batch": config.batch_size,
        "devices": int(mesh.devices.size),
        "platform": mesh.devices.flat[0].platform,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "sample_shape": [int(d) for d in s.world.sample_shape],
        "conditioning": _per_sample_shapes(s.world.uncond),
        "networks": networks,
        "state_bytes_per_device": state_bytes,
        "frozen_bytes_per_device": frozen_bytes,
        "steps": steps,
        "flops_per_step": full["flops"],
        "analytic_flops_per_step": full["analytic_flops"],
        "mean_flops_per_step": None if full_step_only else _mean(steps, "flops"),
        "peak_bytes_per_device": peak,
        "device_memory_bytes": device_memory,
        "fits": fits,
        "advice": advice,
        "seconds": round(time.perf_counter() - start, 1),
    }


def micro_batch_advice(
    memory: dict[str, int], rows: int, micro: int, trained_bytes: int, device_memory: int
) -> dict[str, Any]:
    """An estimate, to confirm by planning with it: the fewest micro-batches whose step fits, assuming the
    temporaries scale with the rows of a micro-batch (activations do; a compile decides) and adding one
    float32 gradient accumulator per trained parameter when accumulation starts. ``rows``: the batch rows per
    device; ``micro``: the micro-batches planned."""
    fixed = memory["peak"] - memory["temp"]
    per_row = memory["temp"] / max(rows // micro, 1)
    accumulator = 0 if micro > 1 else trained_bytes
    for k in range(micro + 1, rows + 1):
        if rows % k:
            continue
        estimate = fixed + accumulator + per_row * (rows // k)
        if estimate <= device_memory:
            return {"micro_batches": k, "estimated_peak_bytes": int(estimate)}
    return {
        "micro_batches": None,
        "note": "no micro-batch count fits: shard over more devices (mesh.fsdp), rematerialise "
        "(teacher.remat), or lower the precision (teacher.dtype)",
    }


def _per_sample_shapes(uncond) -> dict[str, list[int]] | None:
    """The conditioning's per-sample shapes (from the world's unconditional input), by key."""
    if not isinstance(uncond, dict):
        return None
    return {k: [int(d) for d in np.shape(v)[1:]] for k, v in uncond.items()}


def _mean(steps: list[dict], key: str) -> float | None:
    if any(e[key] is None for e in steps):
        return None
    return sum(e[key] * e["fraction"] for e in steps)


def traced_programs(fn, args: tuple) -> list[tuple[Any, Any]]:
    """(jaxpr, lowered) of each program of a step function: one, or one per update under ``split_updates``
    (``train.UpdatePrograms.trace``: a later program's inputs are the earlier one's outputs)."""
    if isinstance(fn, train.UpdatePrograms):
        return [(traced.jaxpr, lowered) for traced, lowered in fn.trace(*args)]
    traced = fn.trace(*args)
    return [(traced.jaxpr, traced.lower())]


def _scan_counted(length: int, unroll) -> int:
    """Iterations of a ``lax.scan`` that XLA's cost analysis sees: the (unrolled) body once, plus the
    remainder iterations lowered outside the loop."""
    u = length if unroll is True else max(int(unroll or 1), 1)
    return length if u >= length else u + length % u


def loop_flops(jaxpr, body_flops: Callable[[Any], float] | None = None) -> float | None:
    """FLOPs XLA's cost analysis misses in a traced program (``jaxpr``, closed or open): each ``lax.scan``'s
    body counted once where it runs ``length`` times (nested scans multiply; a while loop, whose trip count
    is not static, stays counted once, as a conditional's costliest branch). ``body_flops``: XLA's count of
    one scan body (default: its jaxpr lowered alone); None where a body cannot be lowered."""
    if body_flops is None:
        cache: dict[int, tuple[Any, float]] = {}

        def body_flops(closed):
            if id(closed) not in cache:
                args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
                lowered = jax.jit(jax.extend.core.jaxpr_as_fun(closed)).lower(*args)
                cache[id(closed)] = (closed, float((lowered.cost_analysis() or {}).get("flops", 0.0)))
            return cache[id(closed)][1]

    def walk(j) -> float:
        j = getattr(j, "jaxpr", j)
        total = 0.0
        for eqn in j.eqns:
            if eqn.primitive.name == "scan":
                body, length = eqn.params["jaxpr"], eqn.params["length"]
                missed = length - _scan_counted(length, eqn.params.get("unroll", 1))
                total += missed * (body_flops(body) if missed else 0.0) + length * walk(body)
            elif eqn.primitive.name == "cond":
                total += max(walk(b) for b in eqn.params["branches"])
            else:
                total += sum(walk(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        return total

    try:
        return walk(jaxpr)
    except Exception:  # a body that does not lower alone (e.g. abstract devices of another platform)
        return None


def _program(lowered, loops: float | None, mesh, compile: bool) -> dict[str, Any]:
    """FLOPs (all devices; every scan's body counted as often as it runs: ``loops`` added) and, compiled,
    memory of one program."""
    cost = lowered.cost_analysis() or {}
    flops = float(cost.get("flops", 0.0))
    out: dict[str, Any] = {"flops": flops + loops if flops and loops is not None else None}
    if compile:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        out["memory"] = _memory(compiled, mesh.devices.flat[0].platform)
        if out["flops"] is None and loops is not None:  # TPU lowerings give no cost analysis: compiled
            per_device = (compiled.cost_analysis() or {}).get("flops")
            out["flops"] = float(per_device) * mesh.devices.size + loops if per_device else None
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"
