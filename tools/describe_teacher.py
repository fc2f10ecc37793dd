"""What a teacher pipeline is made of, without loading a weight.

    python tools/describe_teacher.py flux_dev             # a teacher preset's stored configs
    python tools/describe_teacher.py /path/to/pipeline    # a diffusers pipeline directory
    python tools/describe_teacher.py sd35_large --json    # {"transformer": {"class", "params", "bytes", ...}}

For each component of ``model_index.json`` that jdistill has a model for: its class, parameter count (the
Flax twin built abstractly from the component's ``config.json``), storage dtype and bytes. In a directory
with safetensors weights, dtype and bytes come from the files' headers (their stored tensors, buffers
included); otherwise from the config's ``torch_dtype`` (float32 where it names none). Tokenizers, schedulers
and components jdistill does not model are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jdistill.models.registry import CLASSES, class_of, component_net  # noqa: E402
from jdistill.teachers.presets import CONFIG_ROOT  # noqa: E402

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}


def resolve(source: str) -> str:
    """A pipeline directory: ``source`` itself, or the stored configs of the preset it names."""
    if os.path.isfile(os.path.join(source, "model_index.json")):
        return source
    stored = os.path.join(CONFIG_ROOT, source)
    if os.path.isfile(os.path.join(stored, "model_index.json")):
        return stored
    presets = sorted(
        n for n in os.listdir(CONFIG_ROOT) if os.path.isfile(os.path.join(CONFIG_ROOT, n, "model_index.json"))
    )
    raise SystemExit(
        f"{source!r} is neither a pipeline directory nor a teacher preset ({', '.join(presets)})"
    )


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file (tensor dtypes, shapes, byte ranges): 8 bytes of length first."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def stored_weights(folder: str) -> tuple[str, int] | None:
    """(dtype(s), bytes) of the safetensors weights in a component folder, or None if it has none."""
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        return None
    dtypes, total = set(), 0
    for name in files:
        for key, info in safetensors_header(os.path.join(folder, name)).items():
            if key == "__metadata__":
                continue
            dtypes.add(info["dtype"])
            total += info["data_offsets"][1] - info["data_offsets"][0]
    return "+".join(sorted(dtypes)), total


def describe(source: str) -> tuple[dict[str, dict], dict[str, str]]:
    """({component: {"class", "params", "dtype", "bytes"}}, {skipped component: why})."""
    path = resolve(source)
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    out, skipped = {}, {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list | tuple):
            continue  # pipeline flags such as requires_safety_checker
        if entry[0] is None:
            skipped[name] = "absent (null in model_index.json)"
            continue
        config_path = os.path.join(path, name, "config.json")
        if not os.path.isfile(config_path):
            skipped[name] = f"{entry[1]} (no config.json: not a model)"
            continue
        with open(config_path) as f:
            config = json.load(f)
        cls = class_of(config, entry)
        if cls not in CLASSES:
            skipped[name] = f"{cls} (no jdistill model)"
            continue
        params = component_net(cls, config).num_params()
        weights = stored_weights(os.path.join(path, name))
        if weights is None:
            dtype = config.get("torch_dtype") or "float32"
            weights = (dtype, params * ITEMSIZE[dtype])
        out[name] = {"class": cls, "params": params, "dtype": weights[0], "bytes": weights[1]}
    return out, skipped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a teacher preset (stored configs) or a diffusers pipeline directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object: component -> description")
    args = parser.parse_args()
    components, skipped = describe(args.source)
    if args.json:
        print(json.dumps(components, indent=1))
        return
    print(f"{'component':16s} {'class':30s} {'params':>16s} {'dtype':>9s} {'GiB':>8s}")
    for name, d in components.items():
        print(f"{name:16s} {d['class']:30s} {d['params']:16,d} {d['dtype']:>9s} {d['bytes'] / 2**30:8.2f}")
    total = sum(d["params"] for d in components.values())
    print(f"{'total':16s} {'':30s} {total:16,d}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")


if __name__ == "__main__":
    main()
