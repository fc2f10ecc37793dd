"""Train-step throughput of a recipe: compile time apart, steps/s, images/s and MFU, per mesh layout.

    python benchmarks/step_throughput.py --config configs/swiftbrush.py:digits --steps 100
    python benchmarks/step_throughput.py --config configs/dmd2.py:digits --steps 100
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/step_throughput.py \
        --config configs/swiftbrush.py:gmm --mesh 1x1 --mesh 8x1 --mesh 4x2
    python benchmarks/step_throughput.py --unet --size sd15 --bf16 --batch 8   # the UNet alone, SD1.5 size

One line per mesh: compile seconds (first step), steady-state steps/s and images (samples)/s, and MFU: the
compiled step's FLOPs (XLA's cost analysis of the lowered program) per second over the device's peak (a table
of accelerators' dense bf16/fp32 peaks; on CPU the measured rate of a large float32 matrix product, so the CPU
MFU reads "fraction of what this CPU's matmul reaches"). ``--unet`` times the teacher UNet's forward+backward
(gradients of all parameters) instead of a recipe's step; ``--size sd15`` builds it from the stored SD1.5 config
with random weights.

benchmarks/torch_baseline.py drives this file as a worker (``--serve``) for the side-by-side comparison with
PyTorch: the same workloads, their inputs and random draws handed to the torch side, parity, alternating timing.
Results go to benchmarks/RESULTS.md with the device, date and machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.environ.get("JDISTILL_BENCH_CPUS"):  # a worker of a pinned comparison: before XLA's thread pool starts
    os.sched_setaffinity(0, {int(c) for c in os.environ["JDISTILL_BENCH_CPUS"].split(",")})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdistill import configuration, parallel, rng, train  # noqa: E402
from jdistill.diffusion.schedules import sample_timesteps  # noqa: E402
from jdistill.teachers.prompts import IDS  # noqa: E402

CONFIGS = os.path.join(ROOT, "jdistill", "teachers", "configs")
PRESETS = {"swiftbrush": "configs/swiftbrush.py:digits", "dmd2": "configs/dmd2.py:digits"}
# Dense peak FLOP/s per device (vendor datasheets, no sparsity): (bf16, fp32 without TF32).
PEAKS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L4": (121e12, 30e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v4": (275e12, 275e12),
}


# ================================================================================================ peak and FLOPs


def peak_flops(bf16: bool) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    kind = jax.devices()[0].device_kind
    for name, (p16, p32) in PEAKS.items():
        if name.lower() in kind.lower():
            return (p16 if bf16 else p32), f"{kind} datasheet"
    if jax.default_backend() != "cpu":
        raise SystemExit(f"no peak FLOP/s known for {kind!r}: add it to PEAKS in {__file__}")
    return measured_matmul_peak(), "measured float32 matmul"


def measured_matmul_peak(n: int = 1024, reps: int = 10) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def program_flops(fn, *args) -> float:
    """FLOPs of one call of the jitted ``fn`` by XLA's cost analysis of the lowered program (a step split
    per update, ``split_updates``: the sum of its programs')."""
    lowered = fn.lower(*args)
    total = 0.0
    for one in lowered if isinstance(lowered, list) else [lowered]:
        cost = one.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        total += float(cost.get("flops", 0.0)) if cost else 0.0
    return total


# ================================================================================================ workloads


def pipeline_dir(size: str, workdir: str) -> str:
    """The diffusers pipeline both sides load: the shipped digits teacher, or SD1.5 with random weights."""
    if size == "digits":
        from jdistill.teachers.presets import DIGITS_TEACHER

        return DIGITS_TEACHER
    return random_pipeline("sd15", os.path.join(workdir, "sd15_random"))


def random_pipeline(preset: str, out: str) -> str:
    """A diffusers pipeline directory with the real ``preset`` architecture (configs stored in
    jdistill/teachers/configs) and random weights; the tokenizer is the digits teacher's, padded to the text
    encoder's length (its ids are valid in any CLIP vocabulary; the benchmark needs shapes, not words)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jdistill.teachers.presets import DIGITS_TEACHER

    if os.path.exists(os.path.join(out, "model_index.json")):
        return out
    src = os.path.join(CONFIGS, preset)
    torch.manual_seed(0)
    with open(os.path.join(src, "unet", "config.json")) as f:
        UNet2DConditionModel.from_config(json.load(f)).save_pretrained(os.path.join(out, "unet"))
    with open(os.path.join(src, "vae", "config.json")) as f:
        AutoencoderKL.from_config(json.load(f)).save_pretrained(os.path.join(out, "vae"))
    text_config = CLIPTextConfig.from_json_file(os.path.join(src, "text_encoder", "config.json"))
    CLIPTextModel(text_config).save_pretrained(os.path.join(out, "text_encoder"))
    shutil.copytree(os.path.join(src, "scheduler"), os.path.join(out, "scheduler"))
    shutil.copytree(os.path.join(DIGITS_TEACHER, "tokenizer"), os.path.join(out, "tokenizer"))
    tok_cfg = os.path.join(out, "tokenizer", "tokenizer_config.json")
    with open(tok_cfg) as f:
        cfg = json.load(f)
    cfg["model_max_length"] = text_config.max_position_embeddings
    with open(tok_cfg, "w") as f:
        json.dump(cfg, f)
    shutil.copy(os.path.join(src, "model_index.json"), os.path.join(out, "model_index.json"))
    return out


class UNetWorkload:
    """The teacher UNet's forward+backward: loss sum(out * w), gradients of every parameter."""

    def __init__(self, pipeline: str, batch: int, bf16: bool, attention: str = "auto", seed: int = 0):
        from jdistill.convert.unet import load_unet
        from jdistill.models.layers import Precision

        precision = Precision(dtype=jnp.bfloat16) if bf16 else Precision()
        self.net, params = load_unet(
            os.path.join(pipeline, "unet"), precision=precision, attention_impl=attention
        )
        self.params = jax.device_put(params)
        cfg = self.net.config
        with open(os.path.join(pipeline, "text_encoder", "config.json")) as f:
            text = json.load(f)
        r = np.random.default_rng(seed)
        size = cfg.sample_size
        self.inputs = {
            "x": r.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32),
            "t": r.integers(0, 1000, batch).astype(np.int32),
            "c": r.standard_normal((batch, text["max_position_embeddings"], cfg.cross_attention_dim)).astype(
                np.float32
            ),
            "w": r.standard_normal((batch, size, size, cfg.out_channels)).astype(np.float32),
        }
        self.batch = batch
        net = self.net

        def loss(p, x, t, c, w):
            out = net.apply(p, x, t.astype(jnp.float32), {"encoder_hidden_states": c})
            return jnp.sum(out.astype(jnp.float32) * w), out

        self.fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        self.args = (self.params, *(jnp.asarray(self.inputs[k]) for k in ("x", "t", "c", "w")))

    def run(self):
        return jax.block_until_ready(self.fn(*self.args))

    def flops(self) -> float:
        return program_flops(self.fn, *self.args)

    def analytic_flops(self) -> float:
        """Forward and backward (weights and inputs: 3 forwards) by the hand count of jdistill.flops: XLA's
        cost analysis does not see fused attention kernels (cuDNN, splash), so GPU MFU is read off this."""
        from jdistill.flops import unet_forward

        x, c = self.inputs["x"], self.inputs["c"]
        return 3.0 * self.batch * unet_forward(self.net.config, x.shape[1], x.shape[2], c.shape[1])

    def reference(self) -> dict:
        from jdistill.convert.unet import unet_state_dict

        (_, out), grads = self.run()
        ref = {"out": np.asarray(out, np.float32)}
        torch_grads = unet_state_dict(jax.tree.map(lambda g: np.asarray(g, np.float32), grads))
        ref.update({f"grad/{k}": v for k, v in torch_grads.items()})
        ref["grad_scale"] = max(float(np.max(np.abs(v))) for v in torch_grads.values())
        return ref


class StepWorkload:
    """A recipe's train step exactly as the trainer runs it (train.StepFunctions), with its random draws
    re-derived for the torch side (the same named streams as the step's losses)."""

    def __init__(self, spec: str, overrides: list[tuple[str, str]], workdir: str):
        self.config = configuration.load(spec, overrides)
        self.s = train.setup(self.config, workdir)
        self.root = jax.random.key(0)
        self.fns = train.StepFunctions(self.s)
        source = self.s.recipe.source(self.s.world)
        self.cycle = 2
        self.host_batches = [
            source.local_batch(i, self.config.batch_size, self.s.rows) for i in range(self.cycle)
        ]
        self.batches = [
            parallel.global_batch(b, self.s.batch_sharding, self.config.batch_size) for b in self.host_batches
        ]
        self.batch = self.config.batch_size
        self.state = train.init_train_state(self.s, self.root)
        self.step_num = 0

    def call(self, state, i: int):
        with jax.set_mesh(self.s.mesh):
            return self.fns(i)(state, self.s.frozen, self.batches[i % self.cycle], np.int32(i), self.root)

    def run(self):
        self.state, metrics = self.call(self.state, self.step_num)
        self.step_num += 1
        return jax.block_until_ready(metrics)

    def flops(self) -> float:
        """Mean FLOPs per step over one cycle of update sets (e.g. DMD2's full and fake-only steps)."""
        total = 0.0
        for i in range(self.cycle):
            fn = self.fns(i)
            args = (self.state, self.s.frozen, self.batches[i % self.cycle], np.int32(i), self.root)
            with jax.set_mesh(self.s.mesh):
                total += program_flops(fn, *args)
        return total / self.cycle

    def draws(self, step: int) -> dict[str, np.ndarray]:
        """The step's noise, timesteps and dropout, as the losses draw them (score_distillation.py)."""
        m, world = self.config.method, self.s.world
        schedule, n = world.teacher.schedule, self.batch
        shape = (n, *world.sample_shape)
        scale = self.s.recipe.student_input_scale
        key = rng.step_key(self.root, step)
        active = {u.name for u in self.s.recipe.active_updates(step)}
        out = {}

        def prior(k):
            latent = rng.streams(k, "latent", "step_index", "simulate")["latent"]
            return scale * schedule.prior_sample(latent, shape)

        if "generator" in active:
            g = rng.streams(rng.stream(key, "generator"), "generate", "timestep", "noise")
            out["z"] = prior(g["generate"])
            out["t"] = sample_timesteps(schedule, g["timestep"], (n,), *m.t_range)
            out["eps"] = jax.random.normal(g["noise"], shape, jnp.float32)
        f = rng.streams(rng.stream(key, "fake_score"), "generate", "timestep", "noise", "dropout", "gan")
        if "generator" not in active:
            out["z_fake"] = prior(f["generate"])
        out["t_fake"] = sample_timesteps(schedule, f["timestep"], (n,), *m.fake_t_range)
        out["eps_fake"] = jax.random.normal(f["noise"], shape, jnp.float32)
        if m.fake_cond_dropout > 0:
            out["drop"] = jax.random.bernoulli(f["dropout"], m.fake_cond_dropout, (n,))
        return {k: np.asarray(v) for k, v in out.items()}

    def inputs(self) -> dict[str, np.ndarray]:
        data = {"cycle": np.int32(self.cycle)}
        for i in range(self.cycle):
            ids = [k for k in self.host_batches[i] if k.startswith(IDS)]
            if len(ids) != 1:
                raise SystemExit(f"the torch baseline mirrors one text encoder; this world has {ids}")
            data[f"ids/{i}"] = np.asarray(self.host_batches[i][ids[0]])
            data.update({f"{k}/{i}": v for k, v in self.draws(i).items()})
        return data

    def reference(self) -> dict:
        """Metrics of the first ``cycle`` steps from a fresh state."""
        state = train.init_train_state(self.s, self.root)
        ref = {"steps": np.int32(self.cycle)}
        for i in range(self.cycle):
            state, metrics = self.call(state, i)
            ref.update({f"{i}/{k}": np.asarray(v) for k, v in jax.device_get(metrics).items()})
        return ref


# ================================================================================================ worker


class Worker:
    """The jdistill side of benchmarks/torch_baseline.py (one JSON command per line)."""

    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="jdistill-bench-")
        self.pipeline = pipeline_dir(args.size, args.workdir or self.tmp)
        self.work: dict[str, object] = {}

    def handle(self, msg: dict) -> dict:
        cmd = msg["cmd"]
        if cmd == "pipeline":
            return {"pipeline": self.pipeline}
        if cmd == "setup":
            return self.setup(msg["workload"])
        if cmd == "profile":
            return {"table": profile_to(self.work[msg["variant"]], msg["dir"], msg["variant"])}
        if cmd == "time":
            work = self.work[msg["variant"]]
            out = []
            for _ in range(msg["iters"]):
                start = time.perf_counter()
                work.run()
                out.append(time.perf_counter() - start)
            return {"seconds": out}
        raise ValueError(f"unknown command {cmd!r}")

    def setup(self, workload: str) -> dict:
        if workload == "unet":
            work = UNetWorkload(self.pipeline, self.args.batch or 32, self.args.bf16, self.args.attention)
            inputs = work.inputs
        else:
            if self.args.size != "digits":
                raise SystemExit("the step comparison runs on the digits world (the torch side mirrors it)")
            overrides = [("batch_size", str(self.args.batch))] if self.args.batch else []
            work = StepWorkload(PRESETS[workload], overrides, os.path.join(self.tmp, workload))
            inputs = work.inputs()
        start = time.perf_counter()
        reference = work.reference()  # the first calls compile
        compile_s = time.perf_counter() - start
        for _ in range(3):
            work.run()
        start = time.perf_counter()
        work.run()
        once = time.perf_counter() - start
        self.work[workload] = work
        paths = {name: os.path.join(self.tmp, f"{workload}_{name}.npz") for name in ("inputs", "reference")}
        np.savez(paths["inputs"], **inputs)
        np.savez(paths["reference"], **reference)
        iters = max(2, min(50, int(1.0 / max(once, 1e-3))))  # about a second per timing block
        # The hand-counted FLOPs of the workload (the same for both sides) and the device's peak: MFU.
        flops = work.analytic_flops() if isinstance(work, UNetWorkload) else None
        peak = peak_flops(self.args.bf16)[0] * jax.device_count()
        return {
            **paths,
            "batch": work.batch,
            "compile_s": compile_s,
            "iters": iters,
            "flops": flops,
            "peak": peak,
        }


# ================================================================================================ standalone


def profile_to(work, out_dir: str, label: str, steps: int = 5) -> str:
    """Trace ``steps`` steps of ``work`` (compiled), write the summary table and, for the UNet workload, the
    compiled HLO text (which names the model code behind each fusion) to ``out_dir``; return the table."""
    from profiles import profile_jax

    label = label.replace("/", "_").replace(" ", "_")
    os.makedirs(out_dir, exist_ok=True)
    table = profile_jax(work.run, tempfile.mkdtemp(prefix="jdistill-trace-"), steps)
    with open(os.path.join(out_dir, f"profile_jdistill_{label}.txt"), "w") as f:
        f.write(table + "\n")
    if isinstance(work, UNetWorkload):
        with open(os.path.join(out_dir, f"hlo_jdistill_{label}.txt"), "w") as f:
            f.write(work.fn.lower(*work.args).compile().as_text())
    return table


def measure(work, steps: int, bf16: bool) -> dict[str, float]:
    start = time.perf_counter()
    work.run()
    compile_s = time.perf_counter() - start
    for _ in range(5):
        work.run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        work.run()
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    flops = work.flops()
    peak, source = peak_flops(bf16)
    analytic = work.analytic_flops() if hasattr(work, "analytic_flops") else None
    extra = {}
    if analytic is not None:
        extra = {
            "analytic_gflops_per_step": analytic / 1e9,
            "mfu_analytic": analytic / step_s / peak / jax.device_count(),
        }
    return {
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "p90_ms": 1e3 * float(np.percentile(times, 90)),
        "max_ms": 1e3 * float(np.max(times)),
        "steps_per_s": 1.0 / step_s,
        "images_per_s": work.batch / step_s,
        # None: the backend's cost analysis counted nothing (jax 0.11.2 on an H200 returned no FLOPs).
        "gflops_per_step": flops / 1e9 if flops else None,
        "mfu": flops / step_s / peak / jax.device_count() if flops else None,
        **extra,
        "peak_source": source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=PRESETS["swiftbrush"])
    parser.add_argument("--unet", action="store_true", help="the teacher UNet's forward+backward alone")
    parser.add_argument("--size", default="digits", choices=("digits", "sd15"))
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (UNet workload; steps: --set)")
    parser.add_argument(
        "--attention",
        default="auto",
        help="UNet workload's attention_impl (auto: cuDNN on GPU in bf16, splash on TPU, else XLA)",
    )
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: the preset's; UNet: 32)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mesh", action="append", default=None, help="DATAxFSDP, e.g. 4x2 (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument("--workdir", default="", help="where the random SD1.5 pipeline is written")
    parser.add_argument("--profile", default="", help="after timing, trace 5 steps: op table (+ HLO) here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="", help=argparse.SUPPRESS)  # the torch side's; jax picks its own
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        from torch_baseline import serve  # the benchmarks' one worker protocol (stdin/stdout JSON lines)

        serve(Worker(args))
        return
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, load {load}")
    tmp = tempfile.mkdtemp(prefix="jdistill-bench-")
    if args.unet:
        pipeline = pipeline_dir(args.size, args.workdir or tmp)
        work = UNetWorkload(pipeline, args.batch or 32, args.bf16, args.attention)
        r = measure(work, args.steps, args.bf16)
        label = f"UNet fwd+bwd {args.size} batch {args.batch or 32} {'bf16' if args.bf16 else 'fp32'}"
        print(f"{label} attention {args.attention}: {json.dumps(_rounded(r))}", flush=True)
        if args.profile:
            print(profile_to(work, args.profile, f"unet_{args.size}_b{work.batch}_{args.attention}"))
        return
    overrides = [tuple(kv.split("=", 1)) for kv in args.set]
    if args.batch:
        overrides.append(("batch_size", str(args.batch)))
    for mesh in args.mesh or [f"{jax.device_count()}x1"]:
        data, fsdp = (int(v) for v in mesh.split("x"))
        mesh_overrides = [
            ("mesh.num_devices", str(data * fsdp)),
            ("mesh.data", str(data)),
            ("mesh.fsdp", str(fsdp)),
        ]
        work = StepWorkload(args.config, [*overrides, *mesh_overrides], os.path.join(tmp, mesh))
        r = measure(work, args.steps, False)
        print(f"{args.config} mesh {mesh}: {json.dumps(_rounded(r))}")
        if args.profile:
            print(profile_to(work, args.profile, f"{os.path.basename(args.config)}_{mesh}"))


def _rounded(r: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}


if __name__ == "__main__":
    main()
