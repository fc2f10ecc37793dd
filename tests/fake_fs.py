"""A fake non-local file system for run directories: ``fake://<name>/...`` paths through ``etils.epath``.

``fake_root(root)`` registers the ``fake://`` scheme with epath (as ``gs://`` is) and stores its files under
``root``. Python code reaches them only through epath: plain ``open``/``os.path`` on a ``fake://`` string
address a relative path ``fake:/...`` in the working directory instead, which the tests look for. Orbax's
array data goes through TensorStore (C++), which cannot call a Python file system: like a ``gs://`` URL for its
GCS driver, a fake path hands TensorStore its backing location (``as_posix``), so checkpoints also land in the
fake store. ``FakeFS.fail_reads`` makes reads raise a transient error (what a network file system does).
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import os
import pathlib
import posixpath
import shutil
from collections.abc import Callable
from typing import ClassVar

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath

SCHEME = "fake://"


@dataclasses.dataclass(eq=False)
class FakeFS(backend_lib._OsPathBackend):
    root: pathlib.Path
    ops: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    read_faults: list[tuple[Callable[[str], bool], int, Callable[[], OSError]]] = dataclasses.field(
        default_factory=list
    )

    def local(self, path) -> str:
        path = os.fspath(path)
        if not path.startswith(SCHEME):
            raise ValueError(f"not a {SCHEME} path: {path!r}")
        return str(self.root / path[len(SCHEME) :])

    def fake(self, local) -> str:
        return SCHEME + os.path.relpath(os.fspath(local), self.root)

    def fail_reads(self, match: Callable[[str], bool], times: int, error: Callable[[], OSError]) -> None:
        """The next ``times`` reads of a path for which ``match`` holds raise ``error()``."""
        self.read_faults.append((match, times, error))

    def _read_fault(self, path: str) -> None:
        for i, (match, times, error) in enumerate(self.read_faults):
            if times > 0 and match(path):
                self.read_faults[i] = (match, times - 1, error)
                raise error()

    def open(self, path, mode):
        self.ops.append(("open:" + mode, os.fspath(path)))
        if "r" in mode:
            self._read_fault(os.fspath(path))
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        self._read_fault(os.fspath(path))
        return super().listdir(self.local(path))

    def glob(self, path):
        pattern = self.local(path)
        parent = os.path.dirname(pattern)
        names = os.listdir(parent) if os.path.isdir(parent) else []
        base = os.path.basename(pattern)
        return [self.fake(os.path.join(parent, n)) for n in names if fnmatch.fnmatch(n, base)]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in os.walk(self.local(top), topdown=top_down, onerror=on_error):
            yield self.fake(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        self.ops.append(("makedirs", os.fspath(path)))
        super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        self.ops.append(("rmtree", os.fspath(path)))
        super().rmtree(self.local(path))

    def remove(self, path):
        super().remove(self.local(path))

    def rename(self, path, dst):
        self.ops.append(("rename", os.fspath(path)))
        if self.exists(dst):
            raise FileExistsError(f"{dst} already exists")
        os.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        os.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        if not overwrite and self.exists(dst):
            raise FileExistsError(f"{dst} already exists")
        shutil.copyfile(self.local(path), self.local(dst))

    def stat(self, path):
        return super().stat(self.local(path))


@epath.register_path_cls(SCHEME)
class FakePath(gpath.PosixGPath):
    """``fake://a/b`` kept as the parts ``/fake/a/b`` (as epath keeps ``gs://a/b``), printed back as the URL."""

    fs: ClassVar[FakeFS | None] = None

    def __new__(cls, *parts):
        full = "/".join(os.fspath(p) for p in parts)
        if full.startswith(SCHEME):
            full = "/fake/" + full[len(SCHEME) :]
        return super().__new__(cls, full)

    @property
    def _uri_scheme(self):
        return "fake" if len(self.parts) >= 2 and self.parts[:2] == ("/", "fake") else None

    @property
    def _path_str(self) -> str:
        if self._uri_scheme:
            return posixpath.join(SCHEME, *self.parts[2:])
        return super()._path_str

    @property
    def _backend(self):
        if self._uri_scheme:
            if FakePath.fs is None:
                raise RuntimeError("fake:// used outside the fake_fs fixture")
            return FakePath.fs
        return super()._backend

    def as_posix(self) -> str:  # TensorStore's address of the file (see the module docstring)
        return self._backend.local(self._path_str) if self._uri_scheme else super().as_posix()


def install(root: pathlib.Path) -> FakeFS:
    FakePath.fs = FakeFS(pathlib.Path(root))
    return FakePath.fs


def uninstall() -> None:
    FakePath.fs = None


def transient_error() -> OSError:
    return OSError(errno.EIO, "Input/output error (simulated network file system)")
