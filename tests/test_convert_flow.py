"""tools/convert_teacher.py on flow-matching pipelines (FLUX with guidance embedding, SD3.5-style MMDiT with
QK norm and a dual-attention block), built here with sizes and options the model tests do not use: every
component converts and matches its PyTorch twin (--verify), and a mis-shaped tensor is refused by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiny_flow_pipeline
from helpers import tool
from safetensors.numpy import load_file, save_file

from jdistill.convert.pipeline import CONVERTED_MARKER, load_pipeline


@pytest.fixture(scope="module")
def flow_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {
        "flux": tiny_flow_pipeline.save_flux_pipeline(root / "flux"),
        "sd3": tiny_flow_pipeline.save_sd3_pipeline(root / "sd3"),
    }


@pytest.mark.parametrize(
    "kind, components",
    [
        ("flux", ["transformer", "vae", "text_encoder", "text_encoder_2"]),
        ("sd3", ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]),
    ],
)
def test_convert_and_verify(flow_pipelines, tmp_path, capsys, kind, components):
    dst = tmp_path / "out"
    assert (
        tool("convert_teacher").main(["--src", str(flow_pipelines[kind]), "--dst", str(dst), "--verify"]) == 0
    )
    out = capsys.readouterr().out
    assert "verification passed" in out
    for name in components:  # every needed component converted and compared, none copied as files
        assert f"\n{name} " in out
    marker = json.loads((dst / CONVERTED_MARKER).read_text())
    assert marker["components"] == components
    pipe = load_pipeline(str(dst))
    assert sorted(pipe.components) == sorted(components)
    t5 = "text_encoder_2" if kind == "flux" else "text_encoder_3"
    assert type(pipe.tokenizers[t5]).__name__.startswith("T5Tokenizer")  # transformers 5: one class


def test_a_mis_shaped_tensor_is_refused_by_name(flow_pipelines, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(flow_pipelines["flux"], src)
    weights = src / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["context_embedder.weight"] = np.ascontiguousarray(state["context_embedder.weight"][:, :-1])
    save_file(state, str(weights))
    assert tool("convert_teacher").main(["--src", str(src), "--dst", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "mis-shaped" in err and "context_embedder.weight" in err
    assert not (tmp_path / "out" / CONVERTED_MARKER).exists()
