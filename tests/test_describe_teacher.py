"""tools/describe_teacher.py: each component's parameter count, from the stored configs alone, equals what
diffusers / transformers build from the same configs on the meta device (no weights on either side)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))

from describe_teacher import describe, safetensors_header

PRESETS = ("sd15", "sdxl", "flux_dev", "flux_schnell", "flux_lite", "sd3_medium", "sd35_medium", "sd35_large")


def torch_count(cls_name: str, config: dict) -> int:
    """Parameters plus persistent buffers (what a checkpoint stores; SD3's positional table is a buffer),
    tied weights once, of the reference class built on the meta device."""
    import diffusers
    import transformers

    with torch.device("meta"):
        if hasattr(diffusers, cls_name) and not cls_name.startswith(("CLIP", "T5")):
            model = getattr(diffusers, cls_name).from_config(config)
        else:
            cfg_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
            model = getattr(transformers, cls_name)(cfg_cls(**config))
    stored = set(model.state_dict())
    params = sum(p.numel() for p in model.parameters())
    return params + sum(b.numel() for name, b in model.named_buffers() if name in stored)


@pytest.mark.parametrize("preset", PRESETS)
def test_counts_equal_the_reference_libraries(preset):
    components, skipped = describe(preset)
    folder = REPO / "jdistill" / "teachers" / "configs" / preset
    index = json.loads((folder / "model_index.json").read_text())
    assert set(components) | set(skipped) == {k for k, v in index.items() if isinstance(v, list)}
    assert {"scheduler", "tokenizer"} <= set(skipped)
    for name, d in components.items():
        config = json.loads((folder / name / "config.json").read_text())
        assert d["params"] == torch_count(d["class"], config), name
        assert d["bytes"] == d["params"] * {"float32": 4, "float16": 2, "bfloat16": 2}[d["dtype"]], name
    if preset.startswith(("flux", "sd3")):
        t5 = components["text_encoder_2" if preset.startswith("flux") else "text_encoder_3"]
        assert t5["class"] == "T5EncoderModel" and t5["params"] == 4_762_310_656  # T5-XXL v1.1 encoder


def test_a_directory_reads_dtype_and_bytes_from_safetensors_headers(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    src = REPO / "jdistill" / "teachers" / "configs" / "sd15"
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    (tmp_path / "vae" / "config.json").write_text((src / "vae" / "config.json").read_text())
    save_file(
        {"a": np.zeros((3, 5), np.float16), "b": np.zeros(7, np.float16)},
        str(tmp_path / "vae" / "w.safetensors"),
    )
    assert set(safetensors_header(str(tmp_path / "vae" / "w.safetensors"))) >= {"a", "b"}
    components, _ = describe(str(tmp_path))
    assert components["vae"]["dtype"] == "F16" and components["vae"]["bytes"] == 2 * (15 + 7)
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "describe_teacher.py"), str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert json.loads(out.stdout) == components
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools" / "describe_teacher.py"), "no_such_teacher"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "neither a pipeline directory nor a teacher preset" in bad.stderr
