"""Python-only reference packages that cannot be installed next to our torch build (tests only).

pytorch-fid (the reference FID InceptionV3) and open-clip-torch need torchvision, and the only torchvision wheels
the package indexes offer for torch 2.13 on Linux x86_64 are CUDA builds (PyTorch's CPU builds live on its own
index, download.pytorch.org, which the development and CI machines cannot reach): installed, their compiled ops
fail to load (``operator torchvision::nms does not exist``), and transformers / diffusers then fail to import
(they import torchvision whenever it is installed). So the test extra cannot install them. The reference code
only needs torchvision's Python model definitions: ``python tests/reference_wheels.py`` (a set-up step after
``pip install -e '.[test]'``, run by .ci/run) downloads the pinned wheels (``pip download --no-deps``, from the
index the install uses) and unpacks their Python files into ``.cache/reference/`` (ignored by git); tests import
them from there with torchvision's package ``__init__`` (which loads the compiled ops) bypassed. Nothing is
installed into the environment, and tests never download: a missing package fails with the set-up command.
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


SETUP = "python tests/reference_wheels.py"


def unpacked(package: str) -> pathlib.Path:
    """The directory holding ``package`` (as imported), unpacked from its pinned wheel by the set-up step."""
    dist, version = WHEELS[package]
    target = ROOT / f"{package}-{version}"
    if not (target / package).is_dir():
        raise RuntimeError(
            f"the reference package {dist}=={version} is not unpacked in {ROOT}: run `{SETUP}` once after "
            "`pip install -e '.[test]'` (it downloads the pinned wheels; tests never do)"
        )
    return target


def fetch(package: str) -> pathlib.Path:
    """Download ``package``'s pinned wheel and unpack its Python files (the set-up step; nothing if already
    there). Safe when run twice at once: each download goes to its own temporary directory and the first rename
    wins."""
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


if __name__ == "__main__":
    for name in WHEELS:
        print(f"{name}: {fetch(name)}")
