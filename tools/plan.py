"""Will it fit? A recipe's per-device memory and per-step FLOPs at real size, before renting the chips.

    python tools/plan.py --config configs/dmd2.py:sd15 [--mesh data=1,fsdp=8] [--batch N]
        [--target cpu|tpu-v5p-8|tpu-v5e-8|tpu-v4-8|tpu-v5p:4x4x4|...] [--compile] [--json] [--config.a.b=v ...]

The run is built abstractly (no weights, tokenizers, prompts or images are read; the preset's stored
configurations give the shapes), for UNet teachers (teacher.kind=diffusers) and flow-matching transformers
(teacher.kind=flow: FLUX.1-dev/schnell/lite, SD3, SD3.5), e.g.

    python tools/plan.py --config configs/scm.py:digits --config.teacher.kind=flow \
        --config.teacher.preset=flux_lite --config.teacher.resolution=1024 --config.method.jvp=jvp ...

Printed: the sample and per-sample conditioning shapes; per network its parameters, bytes and the fraction
left replicated (with the largest replicated parameters named); per device the trained state (parameters,
optimizer state, EMA) and the frozen networks; per distinct train step the FLOPs of the lowered step (XLA's
cost analysis, the whole step over all devices, every scanned loop counted as often as it runs) beside an
analytic count from the recipe's passes.

Targets: ``cpu`` (default) lowers on fake CPU devices, one per mesh position: minutes and a few GB for an
SDXL step, no compile (``--compile`` compiles on the CPU too: slow at real size). A TPU target (``tpu-v5p-8``,
``tpu-v5e-8``, ``tpu-v4-8``, or ``tpu-<generation>:<topology>`` such as ``tpu-v5p:4x4x4``) compiles for abstract
TPU devices of that topology, with no TPU attached, and adds the memory analysis (arguments, outputs,
temporaries, peak per device) and whether the step fits the chip's memory. It needs libtpu:
``pip install -e '.[tpu-plan]'``; an SD1.5 DMD2 step split per update (the SD presets) compiles in about 30
minutes with up to ~23 GB of host memory.

``--json`` prints one JSON object (keys: batch, devices, sample_shape, conditioning (per-sample shapes by
key), networks {name: params, bytes, replicated_fraction, ...}, state_bytes_per_device, flops_per_step,
analytic_flops_per_step (the step with every update active, all devices together), peak_bytes_per_device,
device_memory_bytes, fits, advice (when it does not fit: the fewest micro-batches estimated to fit),
steps [...]; a split step lists its programs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2**30
# name -> (topology, chip configuration, chips per host, HBM bytes per device)
TPUS = {
    "v5p": ("megacore", 95 * GIB),
    "v5e": ("default", 16 * GIB),
    "v4": ("megacore", 32 * GIB),
    "v6e": ("default", 32 * GIB),
}
NAMED = {
    "tpu-v5p-8": "tpu-v5p:2x2x1",
    "tpu-v5e-8": "tpu-v5e:2x4",
    "tpu-v4-8": "tpu-v4:2x2x1",
    "tpu-v6e-8": "tpu-v6e:2x4",
}


def parse_mesh(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in ("data", "fsdp") or not value.lstrip("-").isdigit():
            raise SystemExit(f"--mesh {text!r}: expected data=D,fsdp=F")
        out[key] = int(value)
    return out


def tpu_devices(target: str):
    """Abstract devices of a TPU topology (no TPU needed) and the HBM per device."""
    generation, _, topology = NAMED.get(target, target)[len("tpu-") :].partition(":")
    if generation not in TPUS or not topology:
        raise SystemExit(
            f"--target {target!r}: choose cpu, {', '.join(NAMED)} or tpu-<{'|'.join(TPUS)}>:<AxBxC>"
        )
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as err:  # pragma: no cover
        raise SystemExit(f"TPU targets need jax's topologies module ({err})") from err
    dims = tuple(int(d) for d in topology.split("x"))
    bounds = (*dims[:2], 1) if len(dims) == 3 else (*dims, 1)
    chip_config, hbm = TPUS[generation]
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{generation}:{topology}",
            chip_config_name=chip_config,
            chips_per_host_bounds=tuple(min(b, 2 if generation in ("v5p", "v4") else 4) for b in bounds),
            num_slices=1,
        )
    except Exception as err:
        raise SystemExit(
            f"cannot describe TPU topology {generation}:{topology} ({type(err).__name__}: {err}); TPU targets "
            "need libtpu: pip install -e '.[tpu-plan]'"
        ) from err
    return desc.devices, hbm


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--mesh", default="", help="data=D,fsdp=F (default: the config's mesh over --devices)"
    )
    parser.add_argument(
        "--devices", type=int, default=8, help="CPU target without --mesh: devices to plan for"
    )
    parser.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--compile", action="store_true", help="compile (always for TPU targets)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--full-step-only", action="store_true", help="only the step with every update active"
    )
    from jdistill.configuration import ConfigError, split_config_args

    spec, overrides, rest = split_config_args(argv)
    args = parser.parse_args(rest)
    if spec is None:
        parser.error("--config is required: configs/<recipe>.py[:preset]")
    mesh = parse_mesh(args.mesh) if args.mesh else {}
    if args.target == "cpu":
        count = mesh.get("data", 1) * mesh.get("fsdp", 1) if mesh else args.devices
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()

    import jax

    from jdistill import configuration, plan

    devices, memory = (None, None) if args.target == "cpu" else tpu_devices(args.target)
    extra = [(f"mesh.{k}", str(v)) for k, v in mesh.items()]
    if args.batch:
        extra.append(("batch_size", str(args.batch)))
    if devices is not None and not mesh:
        extra.append(("mesh.data", "-1"))
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    try:
        config = configuration.load(spec, [*overrides, *extra, ("mesh.num_devices", "-1")])
        result = plan.plan(
            config,
            devices,
            compile=args.compile or devices is not None,
            device_memory=memory,
            full_step_only=args.full_step_only,
            log=log,
        )
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result["target"] = args.target
    result["jax"] = jax.__version__
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(render(result))
    return 0


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f} GiB"


def _tf(x) -> str:
    return "-" if x is None else f"{x / 1e12:.1f} TFLOP"


def _memory_text(mem: dict | None) -> str:
    if not mem:
        return ""
    return (
        f"; per device: peak {_gib(mem['peak'])} (arguments {_gib(mem['argument'])}, outputs "
        f"{_gib(mem['output'])}, temporaries {_gib(mem['temp'])})"
    )


def render(r: dict) -> str:
    lines = [
        f"{r['method']} / {r['teacher']}: batch {r['batch']} on {r['devices']} {r['platform']} devices, mesh {r['mesh']}"
    ]
    if r.get("sample_shape"):
        cond = ", ".join(f"{k} {tuple(v)}" for k, v in (r.get("conditioning") or {}).items())
        lines.append(
            f"sample {tuple(r['sample_shape'])}" + (f"; conditioning per sample: {cond}" if cond else "")
        )
    lines.append(f"{'network':<24}{'params':>15}{'bytes':>12}{'per device':>13}{'replicated':>12}")
    for name, n in r["networks"].items():
        tag = "" if n["trained"] else " (frozen)"
        lines.append(
            f"{name + tag:<24}{n['params']:>15,}{_gib(n['bytes']):>12}{_gib(n['bytes_per_device']):>13}"
            f"{n['replicated_fraction']:>12.4f}"
        )
        if n["replicated_fraction"] > 0.01 and r["mesh"].get("fsdp", 1) > 1:
            lines.append(f"    largest replicated: {', '.join(n['replicated'][:5])}")
    lines.append(
        f"trained state per device: {_gib(r['state_bytes_per_device'])}; frozen: {_gib(r['frozen_bytes_per_device'])}"
    )
    for e in r["steps"]:
        ratio = ""
        if e["flops"] and e["analytic_flops"]:
            ratio = f" (XLA / analytic {e['flops'] / e['analytic_flops']:.3f})"
        lines.append(
            f"step {'+'.join(e['updates'])} ({e['fraction']:.0%} of steps): {_tf(e['flops'])}, analytic "
            f"{_tf(e['analytic_flops'])}{ratio}{_memory_text(e.get('memory'))}"
        )
        for p in e.get("programs", ()):  # split_updates: one program per update
            lines.append(
                f"    program {'+'.join(p['updates'])}: {_tf(p['flops'])}{_memory_text(p.get('memory'))}"
            )
    if r["fits"] is not None:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(
            f"{verdict}: peak {_gib(r['peak_bytes_per_device'])} of {_gib(r['device_memory_bytes'])} per device"
        )
    advice = r.get("advice")
    if advice and advice.get("micro_batches"):
        lines.append(
            f"estimate: --config.micro_batches={advice['micro_batches']} would peak near "
            f"{_gib(advice['estimated_peak_bytes'])} (plan again with it to confirm)"
        )
    elif advice:
        lines.append(f"estimate: {advice['note']}")
    lines.append(f"({r['seconds']} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
