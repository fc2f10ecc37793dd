"""Python-only reference packages that cannot be installed next to our torch build (tests only).

pytorch-fid (the reference FID InceptionV3) needs torchvision, and the torchvision wheels on the package index
are CUDA builds: installed, their compiled ops fail to load, and transformers / diffusers then fail to import
(they import torchvision whenever it is installed). The reference code only needs torchvision's Python model
definitions, so the wheels are downloaded (``pip download --no-deps``, from the same index the install uses),
unpacked into ``.cache/reference/`` (ignored by git) and imported from there with torchvision's package
``__init__`` (which loads the compiled ops) bypassed. Nothing is installed into the environment.
"""

from __future__ import annotations

import contextlib
import importlib
import pathlib
import subprocess
import sys
import types
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "reference"
WHEELS = {"torchvision": "0.28.0", "pytorch_fid": "0.3.0"}  # torchvision 0.28 is torch 2.13's release


def unpacked(package: str) -> pathlib.Path:
    """The directory holding ``package`` (as imported) unpacked from its pinned wheel."""
    version = WHEELS[package]
    target = ROOT / f"{package}-{version}"
    if (target / package).is_dir():
        return target
    wheels = ROOT / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = package.replace("_", "-")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--dest",
            str(wheels),
            f"{name}=={version}",
        ],
        check=True,
    )
    (wheel,) = [w for w in wheels.glob(f"{package}-{version}-*.whl")]
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(partial, [m for m in z.namelist() if m.startswith(f"{package}/") and m.endswith(".py")])
    partial.rename(target)
    return target


@contextlib.contextmanager
def _on_path(*dirs: pathlib.Path):
    sys.path[:0] = [str(d) for d in dirs]
    try:
        yield
    finally:
        for d in dirs:
            sys.path.remove(str(d))


def pytorch_fid_inception() -> types.ModuleType:
    """``pytorch_fid.inception``, importable without an installed torchvision.

    A placeholder ``torchvision`` package (only a ``__path__``) stands in while it imports, so that
    ``torchvision.models`` loads from the unpacked wheel; afterwards every ``torchvision`` entry is removed from
    ``sys.modules`` again (the imported module keeps its references), so transformers still sees no torchvision.
    """
    if "pytorch_fid.inception" in sys.modules:
        return sys.modules["pytorch_fid.inception"]
    tv, fid = unpacked("torchvision"), unpacked("pytorch_fid")
    placeholder = types.ModuleType("torchvision")
    placeholder.__path__ = [str(tv / "torchvision")]
    placeholder.__version__ = WHEELS["torchvision"]
    sys.modules["torchvision"] = placeholder
    try:
        with _on_path(fid):
            return importlib.import_module("pytorch_fid.inception")
    finally:
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
