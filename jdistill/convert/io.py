"""Reading checkpoints: diffusers pipeline directories, (sharded) safetensors, variants, hub ids.

Tensors are read lazily, one at a time, so a converter holds at most one full tensor on the host while it
places the parameters. Pickle checkpoints (.bin, .ckpt, .pt) can run code when loaded and are refused unless
the caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import numpy as np

from jdistill.convert.core import ConversionError

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def weight_files(folder: str, variant: str | None = None, allow_pickle: bool = False) -> list[str]:
    """The weight files of one component folder (e.g. ``unet/``), preferring the requested variant."""
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder} is not a directory")
    names = set(os.listdir(folder))
    suffix = f".{variant}" if variant else ""
    for stem in WEIGHT_STEMS:
        single = f"{stem}{suffix}.safetensors"
        if single in names:
            return [os.path.join(folder, single)]
        index = f"{stem}.safetensors.index{suffix}.json"
        if index in names:
            shards = sorted(set(read_json(os.path.join(folder, index))["weight_map"].values()))
            missing = [s for s in shards if s not in names]
            if missing:
                raise ConversionError(
                    f"{os.path.join(folder, index)} lists shards that are missing: {missing}"
                )
            return [os.path.join(folder, s) for s in shards]
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles and allow_pickle:
        return [os.path.join(folder, n) for n in pickles]
    if pickles:
        raise ConversionError(
            f"{folder} only has pickle checkpoints {pickles}; loading pickles can execute arbitrary code. "
            "Convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the source."
        )
    wanted = f" for variant {variant!r}" if variant else ""
    raise ConversionError(f"no safetensors weights{wanted} in {folder} (files: {sorted(names)})")


def component_source(
    source: str | Mapping, config, config_cls, variant: str | None, allow_pickle: bool
) -> tuple[object, Mapping]:
    """(config, state dict) for a component loader: from a folder (config.json + weights, read lazily) or an
    in-memory state dict, which needs ``config`` given."""
    if isinstance(source, str):
        config = config or config_cls.from_dict(read_json(os.path.join(source, "config.json")))
        return config, lazy_state_dict(weight_files(source, variant, allow_pickle))
    if config is None:
        raise ValueError(f"a {config_cls.__name__} is needed with an in-memory state dict")
    return config, source


def lazy_state_dict(files: list[str]) -> Mapping[str, Callable[[], np.ndarray]]:
    """{key: loader} over safetensors files (or trusted pickles); each loader returns a numpy array."""
    out: dict[str, Callable[[], np.ndarray]] = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                keys = list(f.keys())
            for key in keys:
                if key in out:
                    raise ConversionError(f"tensor {key} appears in more than one file ({path})")
                out[key] = _safetensors_loader(path, key)
        else:
            import torch  # trusted pickle: only reached with allow_pickle

            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            for key, value in state.items():
                out[key] = lambda v=value: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


def _safetensors_loader(path: str, key: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(key)

    return load


def resolve_source(src: str, *, allow_download: bool = True) -> str:
    """A local directory for ``src``: the directory itself, or a hub id downloaded with huggingface_hub."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise ConversionError(f"{src} is a file; give a diffusers pipeline directory or a hub id")
    if not allow_download or "/" not in src:
        raise ConversionError(
            f"{src} is not a local directory" + ("" if "/" in src else " nor a hub id (owner/name)")
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ConversionError(f"{src} is not a local directory and huggingface_hub is not installed") from err
    try:
        return snapshot_download(
            src, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model", "tokenizer*/*"]
        )
    except Exception as err:
        raise ConversionError(
            f"could not download {src} from the hub ({type(err).__name__}: {str(err)[:200]}); without network, "
            "download the pipeline elsewhere and pass its local directory"
        ) from err
