"""The package data the project ships (the two digits worlds under jdistill/assets/) is there and readable.

A missing or truncated asset must fail the default run, never skip a test: the digits tests carry no
``skipif`` on these files, and this module names the missing file directly."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import struct
import tomllib

import pytest

from jdistill.teachers.presets import DIGITS_FLUX_ROOT, DIGITS_ROOT

# Per world: its build record, the classifier (UNet world only) and each pipeline component's files.
SHIPPED = {
    DIGITS_ROOT: [
        "build.json",
        "classifier/classifier.json",
        "classifier/classifier.safetensors",
        "teacher/model_index.json",
        "teacher/scheduler/scheduler_config.json",
        "teacher/text_encoder/config.json",
        "teacher/text_encoder/model.safetensors",
        "teacher/tokenizer/vocab.json",
        "teacher/tokenizer/merges.txt",
        "teacher/unet/config.json",
        "teacher/unet/diffusion_pytorch_model.safetensors",
        "teacher/vae/config.json",
        "teacher/vae/diffusion_pytorch_model.safetensors",
    ],
    DIGITS_FLUX_ROOT: [
        "build.json",
        "teacher/model_index.json",
        "teacher/scheduler/scheduler_config.json",
        "teacher/text_encoder/config.json",
        "teacher/text_encoder/model.safetensors",
        "teacher/text_encoder_2/config.json",
        "teacher/text_encoder_2/model.safetensors",
        "teacher/tokenizer/vocab.json",
        "teacher/tokenizer/merges.txt",
        "teacher/tokenizer_2/tokenizer.json",
        "teacher/transformer/config.json",
        "teacher/transformer/diffusion_pytorch_model.safetensors",
        "teacher/vae/config.json",
        "teacher/vae/diffusion_pytorch_model.safetensors",
    ],
}
FILES = [os.path.join(root, name) for root, names in SHIPPED.items() for name in names]


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, os.path.dirname(DIGITS_ROOT)))
def test_shipped_file_is_present_and_readable(path):
    assert os.path.isfile(path), (
        f"package data missing: {path} (reinstall jdistill or restore jdistill/assets/)"
    )
    with open(path, "rb") as f:
        head = f.read(8)
        if path.endswith(".safetensors"):  # an 8-byte header length, then a JSON header (not an LFS pointer)
            (length,) = struct.unpack("<Q", head)
            assert 0 < length < os.path.getsize(path), f"not a safetensors file: {path}"
            header = json.loads(f.read(length))
            # The tensors' bytes end where the file does: a truncated file fails here.
            end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
            assert 8 + length + end == os.path.getsize(path), f"truncated or padded: {path}"
        elif path.endswith(".json"):
            f.seek(0)
            json.load(f)


def test_model_index_names_only_shipped_components():
    """Every component a shipped pipeline's model_index.json names is a folder next to it."""
    for root in SHIPPED:
        teacher = os.path.join(root, "teacher")
        with open(os.path.join(teacher, "model_index.json")) as f:
            index = json.load(f)
        components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
        assert components, teacher
        for name in components:
            assert os.path.isdir(os.path.join(teacher, name)), f"{teacher}: component {name} missing"


def test_assets_are_package_data():
    """pyproject's package-data globs (expanded as setuptools does, recursively under the package) take every
    shipped file into a built, non-editable install."""
    repo = pathlib.Path(__file__).resolve().parent.parent
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "jdistill"
    ]
    packaged = {p for g in globs for p in glob.glob(g, root_dir=repo / "jdistill", recursive=True)}
    for root, names in SHIPPED.items():
        world = os.path.basename(root)
        for name in names:
            inside = f"assets/{world}/{name}"  # the path under the package, as the globs see it
            assert inside in packaged, (
                f"jdistill/{inside} is not package data (pyproject's package-data globs)"
            )
