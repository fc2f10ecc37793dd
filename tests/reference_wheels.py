"""Python-only reference packages that cannot be installed next to our torch build (tests only).

pytorch-fid (the reference FID InceptionV3) and open-clip-torch need torchvision, and the torchvision wheels on the package index
are CUDA builds: installed, their compiled ops fail to load, and transformers / diffusers then fail to import
(they import torchvision whenever it is installed). The reference code only needs torchvision's Python model
definitions, so the wheels are downloaded (``pip download --no-deps``, from the same index the install uses),
unpacked into ``.cache/reference/`` (ignored by git) and imported from there with torchvision's package
``__init__`` (which loads the compiled ops) bypassed. Nothing is installed into the environment.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import subprocess
import sys
import tempfile
import types
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "reference"
# import name -> (distribution, version); torchvision 0.28 is torch 2.13's release.
WHEELS = {
    "torchvision": ("torchvision", "0.28.0"),
    "pytorch_fid": ("pytorch-fid", "0.3.0"),
    "open_clip": ("open-clip-torch", "3.3.0"),
}


def unpacked(package: str) -> pathlib.Path:
    """The directory holding ``package`` (as imported) unpacked from its pinned wheel. Safe when several test
    workers get there at once: each downloads into its own temporary directory and the first rename wins."""
    dist, version = WHEELS[package]
    target = ROOT / f"{package}-{version}"
    if (target / package).is_dir():
        return target
    ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--dest",
                tmp,
                f"{dist}=={version}",
            ],
            check=True,
        )
        (wheel,) = pathlib.Path(tmp).glob("*.whl")
        files = pathlib.Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(
                files, [m for m in z.namelist() if m.startswith(f"{package}/") and m.endswith(".py")]
            )
        try:
            os.rename(files, target)
        except OSError:  # another worker finished first
            if not (target / package).is_dir():
                raise
    return target


@contextlib.contextmanager
def _on_path(*dirs: pathlib.Path):
    sys.path[:0] = [str(d) for d in dirs]
    try:
        yield
    finally:
        for d in dirs:
            sys.path.remove(str(d))


@contextlib.contextmanager
def torchvision_placeholder():
    """A placeholder ``torchvision`` package (only a ``__path__`` into the unpacked wheel) while the body
    imports, so that ``torchvision.models`` / ``transforms`` load without the package ``__init__`` (which loads
    the compiled ops); afterwards every ``torchvision`` entry leaves ``sys.modules`` again (imported modules
    keep their references), so transformers still sees no torchvision."""
    placeholder = types.ModuleType("torchvision")
    placeholder.__path__ = [str(unpacked("torchvision") / "torchvision")]
    placeholder.__version__ = WHEELS["torchvision"][1]
    sys.modules["torchvision"] = placeholder
    try:
        yield
    finally:
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]


def pytorch_fid(module: str = "inception") -> types.ModuleType:
    """``pytorch_fid.<module>`` (``inception``, ``fid_score``), importable without an installed torchvision."""
    name = f"pytorch_fid.{module}"
    if name in sys.modules:
        return sys.modules[name]
    root = unpacked("pytorch_fid")
    with torchvision_placeholder(), _on_path(root):
        return importlib.import_module(name)
