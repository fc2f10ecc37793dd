"""tools/convert_teacher.py on flow-matching pipelines (FLUX with guidance embedding, SD3.5-style MMDiT with
QK norm and a dual-attention block), built here with sizes and options the model tests do not use: every
component converts and matches its PyTorch twin (--verify), a mis-shaped tensor is refused by name, and a needed
component of a class jdistill cannot convert stops the command (unused components are listed as skipped)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_flow_pipeline
from helpers import REPO, subprocess_env, tool
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


def _convert_command(src, dst) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "convert_teacher.py"), "--src", str(src), "--dst", str(dst)]


def _set_class(src, component: str, cls: str) -> None:
    """``component``'s class in ``src`` set to ``cls`` in model_index.json and in its config.json (diffusers'
    ``_class_name``, transformers' ``architectures``)."""
    index = json.loads((src / "model_index.json").read_text())
    index[component] = [index[component][0], cls]
    (src / "model_index.json").write_text(json.dumps(index))
    config = json.loads((src / component / "config.json").read_text())
    config = {**config, "_class_name": cls, **({"architectures": [cls]} if "architectures" in config else {})}
    (src / component / "config.json").write_text(json.dumps(config))


def test_convert_teacher_stops_on_a_needed_component_it_cannot_convert_and_skips_unused_ones(
    flow_pipelines, tmp_path
):
    """The command line on a StableDiffusion3Pipeline directory: an image encoder no teacher uses (diffusers'
    optional IP-adapter SiglipVisionModel) is listed as skipped and copied; a needed component of a class
    jdistill has no model for makes the command fail, naming it, with nothing written at the destination."""
    src = tmp_path / "src"
    shutil.copytree(flow_pipelines["sd3"], src)
    index = json.loads((src / "model_index.json").read_text())
    (src / "image_encoder").mkdir()
    (src / "image_encoder" / "config.json").write_text(
        json.dumps({"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model"})
    )
    index["image_encoder"] = ["transformers", "SiglipVisionModel"]
    (src / "model_index.json").write_text(json.dumps(index))
    ok = subprocess.run(
        _convert_command(src, tmp_path / "ok"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "skipped image_encoder (SiglipVisionModel, not used by a teacher)" in ok.stdout
    marker = json.loads((tmp_path / "ok" / CONVERTED_MARKER).read_text())
    assert marker["components"] == ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    assert marker["skipped"] == {"image_encoder": "SiglipVisionModel"}
    assert (tmp_path / "ok" / "image_encoder" / "config.json").exists()

    # A transformer of an unknown class and a T5 encoder of another architecture (UMT5, as some pipelines use).
    for component, cls in (("transformer", "SD3ControlNetModel"), ("text_encoder_3", "UMT5EncoderModel")):
        bad_src, dst = tmp_path / f"src_{component}", tmp_path / f"bad_{component}"
        shutil.copytree(src, bad_src)
        _set_class(bad_src, component, cls)
        bad = subprocess.run(
            _convert_command(bad_src, dst), env=subprocess_env(), capture_output=True, text=True, timeout=300
        )
        assert bad.returncode != 0
        assert f"cannot convert {component} ({cls})" in bad.stderr, bad.stderr
        assert not dst.exists()  # nothing half converted
