"""The PyTorch baseline: jdistill's swiftbrush and dmd2 steps and the UNet forward+backward, in diffusers + torch.

    python benchmarks/torch_baseline.py                      # CPU, digits size: parity, then jdistill vs torch
    python benchmarks/torch_baseline.py --size sd15 --bf16 --workload unet --batch 8   # a GPU: SD1.5 UNet,
                                                             # random weights, bf16 (jdistill) / autocast (torch)
    python benchmarks/torch_baseline.py --threads 1          # both sides on one core: robust on a busy machine

The torch side does the math of jdistill's step (methods/swiftbrush.py, dmd2.py, score_distillation.py,
distribution.py and train.make_step) with the settings read from the same preset: one-step student, teacher
and fake score under classifier-free guidance in one batched pass of 2B, the pseudo-target generator loss,
the fake score's denoising loss on the carried sample, prompt dropout, Adam/AdamW with global-norm clipping and
warm-up, the skip of a non-finite update (loss or gradient norm; jdistill also checks the new parameters) and
the student's EMA. Random draws (noise, timesteps, dropout) come from the jdistill side so that both compute
the same numbers: the comparison first checks the UNet's output and parameter gradients and each update's loss
and gradient norm (relative 1e-4), then times both sides in alternating rounds (pairs keep the ratio honest on a
noisy machine) and reports medians. Variants: eager, and ``torch.compile`` on every UNet (``--no-compile``
drops it). On CUDA: SDPA attention (diffusers' default), bf16 autocast with ``--bf16``, TF32 matmuls.

Each side runs in its own worker process (``--serve``, driven over stdin/stdout by the comparison); jdistill's
worker is benchmarks/step_throughput.py. Results go to benchmarks/RESULTS.md with the date and machine load.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.environ.get("JDISTILL_BENCH_CPUS"):  # a worker of a pinned comparison: before any thread pool starts
    os.sched_setaffinity(0, {int(c) for c in os.environ["JDISTILL_BENCH_CPUS"].split(",")})

WORKLOADS = ("unet", "swiftbrush", "dmd2")
PRESETS = {"swiftbrush": "configs/swiftbrush.py", "dmd2": "configs/dmd2.py"}
PARITY_RTOL = 1e-4
BF16_PARITY_RTOL = 0.1  # coarse: a wrong computation differs by order 1
# Gradients of a random-weight UNet are ill-conditioned: fp32 rounding alone moved the worst leaf by 5e-4 of
# the largest gradient (a shrunken SD1.5 configuration; the trained digits UNet agrees to 1e-6). In bf16 the
# gradients are only reported.
RANDOM_GRAD_RTOL = 2e-3
GRAD_RTOL = {"digits": PARITY_RTOL, "sd15": RANDOM_GRAD_RTOL}


# ================================================================================================ torch side


def _torch():
    import torch

    return torch


class TorchSide:
    """The torch workloads on one device, built from the same pipeline directory as the jdistill side."""

    def __init__(self, pipeline: str, device: str, bf16: bool, threads: int = 0):
        torch = _torch()
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.device, self.bf16 = torch.device(device), bf16
        self.teacher = UNet2DConditionModel.from_pretrained(os.path.join(pipeline, "unet")).float()
        self.teacher.to(self.device).requires_grad_(False).eval()
        self.text = CLIPTextModel.from_pretrained(os.path.join(pipeline, "text_encoder")).float()
        self.text.to(self.device).requires_grad_(False).eval()
        tok = CLIPTokenizer.from_pretrained(os.path.join(pipeline, "tokenizer"))
        empty = tok(
            [""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            self.uncond = self.text(empty.to(self.device)).last_hidden_state
        self.programs: dict[str, object] = {}

    def autocast(self):
        torch = _torch()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def tensor(self, a, dtype=None):
        torch = _torch()
        return torch.as_tensor(np.asarray(a), device=self.device, dtype=dtype)

    def sync(self):
        if self.device.type == "cuda":
            _torch().cuda.synchronize()


class UNetWork:
    """Forward and backward of the teacher's UNet on fixed inputs: loss = sum(out * w), gradients of the
    parameters (a trainable copy)."""

    def __init__(self, side: TorchSide, inputs: dict, compiled: bool, grad_rtol: float = PARITY_RTOL):
        torch = _torch()
        self.side, self.grad_rtol = side, grad_rtol
        self.unet = copy.deepcopy(side.teacher).requires_grad_(True).train()
        self.call = torch.compile(self.unet) if compiled else self.unet
        self.x = side.tensor(inputs["x"].transpose(0, 3, 1, 2))
        self.t = side.tensor(inputs["t"], torch.float32)
        self.c = side.tensor(inputs["c"])
        self.w = side.tensor(inputs["w"].transpose(0, 3, 1, 2))
        self.batch = self.x.shape[0]

    def run(self):
        self.unet.zero_grad(set_to_none=True)
        with self.side.autocast():
            out = self.call(self.x, self.t, self.c).sample
        loss = (out.float() * self.w).sum()
        loss.backward()
        return out, loss

    def parity(self, ref: dict) -> list[str]:
        out, _ = self.run()
        errors = [_rel("unet output", out.detach().permute(0, 2, 3, 1), ref["out"])]
        grads = {k: p.grad for k, p in self.unet.named_parameters()}
        worst = max(grads, key=lambda k: _rel_value(grads[k], ref["grad/" + k], scale=ref["grad_scale"]))
        errors.append(
            _rel(
                f"unet gradients (worst: {worst})",
                grads[worst],
                ref["grad/" + worst],
                ref["grad_scale"],
                self.grad_rtol,
            )
        )
        return errors


class Optimizer:
    """One network's optax chain from the preset, in torch: global-norm clip, Adam/AdamW, linear warm-up."""

    def __init__(self, params, cfg):
        torch = _torch()
        self.params, self.cfg, self.count = list(params), cfg, 0
        kind = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        extra = {"weight_decay": cfg.weight_decay}
        if cfg.name == "adam" and cfg.weight_decay:
            raise NotImplementedError("Adam with added decayed weights (optax chain) is not mirrored here")
        if cfg.schedule != "constant":
            raise NotImplementedError(f"learning-rate schedule {cfg.schedule!r} is not mirrored here")
        self.opt = kind(self.params, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, foreach=True, **extra)

    def step(self, loss) -> tuple[float, bool]:
        """Clip, check, update; returns (gradient norm before clipping, applied)."""
        torch = _torch()
        clip = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        ok = bool(torch.isfinite(loss) & torch.isfinite(norm))
        if ok:
            warm = self.cfg.warmup_steps
            scale = min(self.count, warm) / warm if warm else 1.0  # optax counts from 0: first lr is 0
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.lr * scale
            self.opt.step()
            self.count += 1
        self.opt.zero_grad(set_to_none=True)
        return norm, ok


class DistillStep:
    """jdistill's swiftbrush or dmd2 step (one-step student, full-UNet fake score) on the digits world."""

    def __init__(self, side: TorchSide, method: str, config, compiled: bool):
        torch = _torch()
        self.side, self.method, self.m = side, method, config.method
        self.student = copy.deepcopy(side.teacher).requires_grad_(True).train()
        self.fake = copy.deepcopy(side.teacher).requires_grad_(True).train()
        wrap = torch.compile if compiled else (lambda f: f)
        self.call = {
            "student": wrap(self.student),
            "fake": wrap(self.fake),
            "teacher": wrap(side.teacher),
        }
        nets = config.networks
        self.opts = {
            "student": Optimizer(self.student.parameters(), nets.student.optimizer),
            "fake": Optimizer(self.fake.parameters(), nets.fake_score.optimizer),
        }
        self.ema_decay = nets.student.ema_decay
        self.ema = [p.detach().clone() for p in self.student.parameters()] if self.ema_decay > 0 else None
        betas = (
            np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
        )  # the teacher's scaled_linear
        abar = side.tensor(np.cumprod(1.0 - betas), torch.float32)
        self.alpha, self.sigma = abar.sqrt(), (1.0 - abar).sqrt()
        self.t0 = float(self.m.student_timesteps[0] if method == "dmd2" else self.m.student_timestep)
        self.generator_every = self.m.generator_every

    # -- pieces
    def coef(self, t):
        t = t.long()
        return self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)

    def eps(self, name, x_t, t, cond):
        with self.side.autocast():
            out = self.call[name](x_t, t.float(), cond).sample
        return out.float()

    def cfg_eps(self, name, x_t, t, cond, scale):
        torch = _torch()
        if scale == 1.0:
            return self.eps(name, x_t, t, cond)
        n = x_t.shape[0]
        both = self.eps(
            name,
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            torch.cat([cond, self.side.uncond.expand_as(cond)]),
        )
        c, u = both[:n], both[n:]
        return u + scale * (c - u)

    def generate(self, z, cond):
        """The one-step student's x0 (non-finite samples zeroed)."""
        torch = _torch()
        t0 = torch.full((z.shape[0],), self.t0, device=z.device)
        a, s = self.coef(t0)
        x = (z - s * self.eps("student", z, t0, cond)) / a
        ok = torch.isfinite(x).flatten(1).all(1).view(-1, 1, 1, 1)
        return torch.where(ok, x, torch.zeros_like(x))

    # -- updates
    def generator(self, cond, d):
        torch = _torch()
        x = self.generate(d["z"], cond)
        a, s = self.coef(d["t"])
        x_t = a * x.detach() + s * d["eps"]
        with torch.no_grad():
            if self.method == "swiftbrush":
                w = self.m.guidance_scale
                real = self.cfg_eps("teacher", x_t, d["t"], cond, w)
                fake = self.cfg_eps("fake", x_t, d["t"], cond, w)
                g = torch.nan_to_num(s**2 * (real - fake))
            else:  # DMD2: x0 predictions, real score guided, fake score unguided, per-sample normalised
                real = (x_t - s * self.cfg_eps("teacher", x_t, d["t"], cond, self.m.guidance_scale)) / a
                fake = (x_t - s * self.eps("fake", x_t, d["t"], cond)) / a
                norm = (x.detach() - real).abs().flatten(1).mean(1).clamp_min(1e-6).view(-1, 1, 1, 1)
                g = torch.nan_to_num((fake - real) / norm, nan=0.0, posinf=0.0, neginf=0.0)
        loss = 0.5 * ((x - (x - g).detach()) ** 2).mean()
        loss.backward()
        return x.detach(), loss

    def fake_update(self, cond, d, x):
        torch = _torch()
        if x is None:  # a fake-only step: a fresh sample without gradient
            with torch.no_grad():
                x = self.generate(d["z_fake"], cond)
        ok = torch.isfinite(x).flatten(1).all(1).view(-1, 1, 1, 1)
        x = torch.where(ok, x, torch.zeros_like(x))
        if self.m.fake_cond_dropout > 0:
            cond = torch.where(d["drop"].view(-1, 1, 1), self.side.uncond.expand_as(cond), cond)
        a, s = self.coef(d["t_fake"])
        x_t = a * x + s * d["eps_fake"]
        pred = self.eps("fake", x_t, d["t_fake"], cond)
        err = ((pred - d["eps_fake"]) ** 2).flatten(1).mean(1)
        weight = a.flatten() ** 2 if self.m.fake_weighting == "alpha2" else torch.ones_like(err)
        loss = (weight * err).mean()
        loss.backward()
        return loss

    def step(self, step_num: int, ids, draws: dict) -> dict:
        torch = _torch()
        with torch.no_grad():
            cond = self.side.text(ids).last_hidden_state
        metrics, x = {}, None
        if step_num % self.generator_every == 0:
            x, loss = self.generator(cond, draws)
            norm, _ = self.opts["student"].step(loss)
            metrics.update({"generator/loss": loss, "generator/grad_norm": norm})
            if self.ema is not None:
                decay = min(self.ema_decay, (1.0 + step_num) / (10.0 + step_num))
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.student.parameters()], 1.0 - decay)
        loss = self.fake_update(cond, draws, x)
        norm, _ = self.opts["fake"].step(loss)
        metrics.update({"fake_score/loss": loss, "fake_score/grad_norm": norm})
        return metrics


def _rel_value(a, b, scale=None) -> float:
    a = a.detach().float().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    b = np.asarray(b)
    return float(np.max(np.abs(a - b)) / (scale if scale is not None else max(np.max(np.abs(b)), 1e-12)))


def _rel(what: str, a, b, scale=None, rtol: float | None = None) -> str:
    err = _rel_value(a, b, scale)
    rtol = PARITY_RTOL if rtol is None else rtol
    return f"{what}: relative difference {err:.1e}" + ("" if err < rtol else " (NOT EQUAL)")


# ================================================================================================ serving


def flops_of(fn) -> float:
    """FLOPs of one call, by torch's own counter (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


class TorchWorker:
    def __init__(self, args):
        global PARITY_RTOL
        from jdistill import configuration

        if args.bf16:  # bf16 products on both sides, rounded differently (random weights: up to 5%)
            PARITY_RTOL = BF16_PARITY_RTOL
        self.args = args
        self.grad_rtol = math.inf if args.bf16 else GRAD_RTOL[args.size]
        self.side = TorchSide(args.pipeline, args.device, args.bf16, args.threads)
        self.configs = {w: configuration.load(f"{PRESETS[w]}:digits", []) for w in PRESETS}
        self.work: dict[str, object] = {}
        self.step_num: dict[str, int] = {}
        self.data: dict[str, dict] = {}

    def handle(self, msg: dict) -> dict:
        cmd = msg["cmd"]
        if cmd == "setup":
            return self.setup(msg)
        if cmd == "parity":
            return {"checks": self.parity(msg)}
        if cmd == "time":
            return {"seconds": self.time(msg["variant"], msg["iters"])}
        if cmd == "flops":
            return {"flops": self.flops(msg["variant"])}
        if cmd == "profile":
            return {"table": self.profile(msg["variant"], msg["dir"])}
        raise ValueError(f"unknown command {cmd!r}")

    def setup(self, msg: dict) -> dict:
        data = dict(np.load(msg["inputs"]))
        workload = msg["workload"]
        self.data[workload] = data
        for compiled in (False, True) if self.args.compile else (False,):
            variant = f"{workload}/{'compiled' if compiled else 'eager'}"
            if workload == "unet":
                self.work[variant] = UNetWork(self.side, data, compiled, self.grad_rtol)
            else:
                self.work[variant] = DistillStep(self.side, workload, self.configs[workload], compiled)
            self.step_num[variant] = 0
            start = time.perf_counter()
            self.run(variant)  # first call: compiles where torch.compile is on
            self.side.sync()
            self.data[variant + "/compile_s"] = time.perf_counter() - start
        return {"variants": [v for v in self.work if v.startswith(workload + "/")]}

    def draws(self, workload: str, step: int) -> tuple:
        torch = _torch()
        d = self.data[workload]
        k = step % int(d["cycle"])
        ids = self.side.tensor(d[f"ids/{k}"], torch.long)
        draws = {}
        for key in ("z", "t", "eps", "t_fake", "eps_fake", "drop", "z_fake"):
            if f"{key}/{k}" in d:
                a = d[f"{key}/{k}"]
                a = a.transpose(0, 3, 1, 2) if a.ndim == 4 else a
                draws[key] = self.side.tensor(a, torch.bool if key == "drop" else None)
        return ids, draws

    def run(self, variant: str):
        work = self.work[variant]
        if isinstance(work, UNetWork):
            return work.run()
        workload = variant.split("/")[0]
        n = self.step_num[variant]
        ids, draws = self.draws(workload, n)
        self.step_num[variant] = n + 1
        return work.step(n, ids, draws)

    def parity(self, msg: dict) -> list[str]:
        workload = msg["workload"]
        ref = dict(np.load(msg["reference"]))
        checks = []
        for variant in [v for v in self.work if v.startswith(workload + "/")]:
            if workload == "unet":  # stateless between calls: the timed work itself (no second compile)
                checks += [f"{variant} {c}" for c in self.work[variant].parity(ref)]
                continue
            fresh = DistillStep(self.side, workload, self.configs[workload], variant.endswith("compiled"))
            for step in range(int(ref["steps"])):
                ids, draws = self.draws(workload, step)
                metrics = fresh.step(step, ids, draws)
                for key, value in metrics.items():
                    checks.append(
                        f"{variant} step {step} {key}: " + _rel("", value, ref[f"{step}/{key}"])[2:]
                    )
        return checks

    def time(self, variant: str, iters: int) -> list[float]:
        out = []
        for _ in range(iters):
            start = time.perf_counter()
            self.run(variant)
            self.side.sync()
            out.append(time.perf_counter() - start)
        return out

    def flops(self, variant: str) -> float:
        return flops_of(lambda: self.run(variant))

    def profile(self, variant: str, out_dir: str, steps: int = 5) -> str:
        """torch.profiler over ``steps`` steps: the ops' table by self device time, also written to out_dir."""
        torch = _torch()
        cuda = self.side.device.type == "cuda"
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if cuda else []
        )
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(steps):
                self.run(variant)
            self.side.sync()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"profile_torch_{variant.replace('/', '_')}.txt"), "w") as f:
            f.write(f"{steps} steps\n{table}\n")
        return table


def serve(worker) -> None:
    """One JSON command per stdin line, one JSON answer per stdout line (logs go to stderr)."""
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = worker.handle(json.loads(line))
        except Exception as e:  # reported to the driver, which stops
            import traceback

            traceback.print_exc()
            answer = {"error": f"{type(e).__name__}: {e}"}
        real_stdout.write(json.dumps(answer) + "\n")
        real_stdout.flush()


# ================================================================================================ driver


class Client:
    def __init__(self, argv: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )

    def __call__(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} exited (code {self.proc.poll()}); see its log above")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"worker {self.proc.args[1]}: {answer['error']}")
        return answer

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def compare(args) -> dict:
    """Parity, then alternating timing rounds of every variant; medians and paired ratios."""
    common = ["--size", args.size, "--device", args.device] + (["--bf16"] if args.bf16 else [])
    common += ["--batch", str(args.batch)] if args.batch else []
    env = {}
    if args.threads:
        common += ["--threads", str(args.threads)]
        # Both workers on the same first cores (they never run at once); one thread: XLA's too.
        env["JDISTILL_BENCH_CPUS"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.threads])
        if args.threads == 1:
            env["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
            ).strip()
    jd_only = ["--attention", args.attention] + (["--workdir", args.workdir] if args.workdir else [])
    jd = Client(["benchmarks/step_throughput.py", "--serve", *common, *jd_only], env)
    pipeline = jd(cmd="pipeline")["pipeline"]
    tw = Client(
        ["benchmarks/torch_baseline.py", "--serve", "--pipeline", pipeline, *common]
        + ([] if args.compile else ["--no-compile"]),
        env,
    )
    report: dict = {"load_before": _load(), "threads": args.threads, "workloads": {}}
    try:
        for workload in args.workloads:
            inputs = jd(cmd="setup", workload=workload)
            variants = tw(cmd="setup", workload=workload, inputs=inputs["inputs"])["variants"]
            checks = tw(cmd="parity", workload=workload, reference=inputs["reference"])["checks"]
            for c in checks:
                print("  parity", c, flush=True)
            if any("NOT EQUAL" in c for c in checks):
                if not args.keep_going:
                    raise SystemExit(
                        f"{workload}: the two sides disagree; not timing (see the parity lines above)"
                    )
                print(f"  {workload}: the two sides disagree; timed anyway (--keep-going)", flush=True)
            names = ["jdistill", *variants]
            clients = {"jdistill": jd, **{v: tw for v in variants}}
            per: dict[str, list[float]] = {n: [] for n in names}
            iters = inputs["iters"]
            for _ in range(args.rounds):
                for name in names:
                    seconds = clients[name](
                        cmd="time", variant=name if name != "jdistill" else workload, iters=iters
                    )
                    per[name].append(float(np.mean(seconds["seconds"])))  # a block may mix update sets
            base = np.asarray(per["jdistill"])
            result = {
                "batch": inputs["batch"],
                "jdistill_ms": 1e3 * float(np.median(base)),
                "jdistill_compile_s": inputs["compile_s"],
                "jdistill_images_per_s": inputs["batch"] / float(np.median(base)),
            }
            if inputs["flops"]:  # MFU from the hand count (XLA's misses fused attention; torch's too)
                result["jdistill_mfu"] = inputs["flops"] / (result["jdistill_ms"] / 1e3) / inputs["peak"]
            for v in variants:
                kind = v.split("/")[1]
                if inputs["flops"]:
                    mfu = inputs["flops"] / float(np.median(per[v])) / inputs["peak"]
                    result[f"torch_{kind}_mfu"] = mfu
                result[f"torch_{kind}_ms"] = 1e3 * float(np.median(per[v]))
                result[f"torch_{kind}_images_per_s"] = inputs["batch"] / float(np.median(per[v]))
                result[f"ratio_vs_{kind}"] = float(
                    np.median(base / np.asarray(per[v]))
                )  # < 1: jdistill faster
            report["workloads"][workload] = result
            if args.profile:
                print(jd(cmd="profile", variant=workload, dir=args.profile)["table"], flush=True)
                compiled = [v for v in variants if v.endswith("compiled")] or variants
                print(tw(cmd="profile", variant=compiled[0], dir=args.profile)["table"], flush=True)
            print(
                workload,
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
            )
    finally:
        jd.close()
        tw.close()
    report["load_after"] = _load()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="digits", choices=("digits", "sd15"))
    parser.add_argument("--device", default="cuda" if _torch().cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (torch) / bf16 compute (jdistill)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="pin both sides to this many cores and threads (0: all, defaults)",
    )
    parser.add_argument("--workload", dest="workloads", action="append", choices=WORKLOADS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: the presets' 32)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--attention", default="auto", help="jdistill's attention_impl (UNet workload)")
    parser.add_argument(
        "--workdir", default="", help="where jdistill's worker writes the random SD1.5 pipeline"
    )
    parser.add_argument("--keep-going", action="store_true", help="time even when the parity checks fail")
    parser.add_argument("--profile", default="", help="after timing, profile both sides: op tables here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(TorchWorker(args))
        return
    args.workloads = args.workloads or list(WORKLOADS)
    print(f"machine load before: {_load()}", flush=True)
    report = compare(args)
    print(f"machine load after: {report['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
