"""pytorch-fid's FID Inception weights -> jdistill's ``FIDInceptionV3`` (and to safetensors, to convert once).

The source is the file pytorch-fid downloads, ``pt_inception-2015-12-05-6726825d.pth`` (a torch state dict of
``pytorch_fid.inception.fid_inception_v3()``; see ``FID_WEIGHTS_URL``), or a ``.safetensors`` file with the same
keys, as ``save_safetensors`` writes it. jdistill never downloads it: fetch it once and pass its path.

The model's attribute names are the state dict's, so ``convert.core``'s generic rules map every key (conv
kernels OIHW -> HWIO, ``fc`` (out, in) -> (in, out)); batch norms' ``num_batches_tracked`` counters are
skipped. Loading is strict: ``ConversionError`` names every missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jdistill.convert.core import ConversionError, load_state_dict, to_state_dict
from jdistill.models.inception import inception_net
from jdistill.models.net import Net

PyTree = Any
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
IGNORE = (r"\.num_batches_tracked$",)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{key: float32 array} of a ``.pth`` torch state dict (needs torch) or a ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(
            f"no FID Inception weights at {path}: download pytorch-fid's {FID_WEIGHTS_NAME} once "
            f"({FID_WEIGHTS_URL}) and pass its path (jdistill does not download it)"
        )
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    if not path.endswith((".pth", ".pt")):
        raise ConversionError(f"{path}: expected a .pth torch state dict or a .safetensors file")
    try:
        import torch
    except ImportError as err:
        raise ConversionError(
            f"reading {path} needs PyTorch (pip install torch; the CPU build is enough). Or convert it once "
            "where torch is installed: python tools/fid_stats.py --inception FILE.pth --to FILE.safetensors"
        ) from err
    # weights_only: tensors and plain containers only, so a tampered file cannot run code while loading.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} is not a torch state dict (a mapping of tensor names to tensors)")
    return {k: v.detach().float().numpy() for k, v in state.items()}


def load_inception(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    matmul_precision: Any = "highest",
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
) -> tuple[Net, PyTree]:
    """(Net, params) of the FID InceptionV3 from a weights file (``read_state_dict``) or an in-memory state
    dict of numpy arrays. Raises ``ConversionError`` naming every missing, unexpected or mis-shaped key."""
    state = source if isinstance(source, Mapping) else read_state_dict(source)
    net = inception_net(matmul_precision)
    params = load_state_dict(net.abstract, state, ignore=IGNORE, place=place, what="FID InceptionV3")
    return net, params


def inception_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    """The torch state dict (numpy, torch layouts) of FID Inception parameters, without the batch-norm
    ``num_batches_tracked`` counters (unused at inference)."""
    return to_state_dict(params)


def save_safetensors(params: PyTree, path: str | os.PathLike) -> int:
    """Write FID Inception parameters as safetensors with pytorch-fid's keys (loads with ``load_inception``);
    returns the number of tensors written."""
    from safetensors.numpy import save_file

    state = inception_state_dict(params)
    save_file(state, os.fspath(path), metadata={"format": "pt"})
    return len(state)


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Validate the weights at ``src`` against the model and write them to ``dst`` (.safetensors); returns the
    number of tensors written. Later loads then need neither torch nor pickle."""
    if not os.fspath(dst).endswith(".safetensors"):
        raise ValueError(f"the converted file must end in .safetensors, got {dst}")
    _, params = load_inception(src)
    return save_safetensors(params, dst)
