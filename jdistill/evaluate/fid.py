"""FID (Frechet Inception Distance) with pytorch-fid's protocol, in JAX.

The protocol, step by step (pytorch-fid 0.3.0's ``InceptionV3(resize_input=True, normalize_input=True)`` and
``fid_score``; every step is in this module's code):

1. Images: (N, H, W, 3) RGB, uint8 (divided by 255 in float32, as torchvision's ``ToTensor``) or float in
   [0, 1] (float values are used as given: pytorch-fid reads PNG files, i.e. 8-bit levels, so to reproduce a
   number computed from saved PNGs pass uint8 images, e.g. ``np.round(x * 255).astype(np.uint8)``). Floats
   outside [0, 1] by more than ``images.RANGE_SLACK`` are refused (a [-1, 1] VAE output is a common mistake).
2. Resize to 299 x 299 by bilinear interpolation with half-pixel centres and *no* antialiasing: torch's
   ``F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)`` (``antialias=False``, its
   default), which is what pytorch-fid calls; so shrinking large images aliases exactly as in pytorch-fid.
   Here: ``jax.image.resize(..., method="bilinear", antialias=False)``, equal to torch's up to float rounding
   (tested). 299 x 299 inputs pass through unchanged.
3. Scale to [-1, 1]: ``2 x - 1``.
4. Features: pool3 (2048-d, after the global average pool) of the FID InceptionV3
   (``jdistill.models.inception``, weights converted from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
   by ``jdistill.convert.inception``), float32, in fixed-size batches under ``jax.jit`` (the last batch is
   padded, so the network compiles once; steps 1-3 compile once per input size and dtype).
5. Statistics: mean and covariance (normalised by N - 1) of the features in float64 (``np.cov``, as
   pytorch-fid).
6. FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): ``jdistill.evaluate.frechet.frechet_distance`` (generic,
   any feature space), with pytorch-fid's handling of a near-singular product (eps * I added to both
   covariances) and of a negligible imaginary part of the square root.

Reference statistics are stored as ``.npz`` files with arrays ``mu`` (d,) and ``sigma`` (d, d): pytorch-fid's
format (``--save-stats``), so statistics files move between the two tools both ways.

>>> features = InceptionFeatures.from_file("pt_inception-2015-12-05-6726825d.pth")   # doctest: +SKIP
>>> save_statistics("ref.npz", statistics_of(real_images, features))                 # doctest: +SKIP
>>> fid(generated_images, "ref.npz", features)                                         # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.evaluate.frechet import frechet_distance, statistics
from jdistill.evaluate.images import checked_images
from jdistill.models.net import Net

__all__ = [
    "RESOLUTION",
    "InceptionFeatures",
    "Statistics",
    "fid",
    "frechet_distance",
    "load_statistics",
    "preprocess",
    "read_images",
    "save_statistics",
    "statistics",
    "statistics_of",
]

PyTree = Any
RESOLUTION = 299
# Float images outside [0, 1] by more than this are taken for a mistake (e.g. [-1, 1] VAE outputs).
# pytorch-fid's IMAGE_EXTENSIONS (fid_score.py).
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
Images = np.ndarray | Iterable[np.ndarray]
# uint8 -> [0, 1] through a table of the 256 correctly rounded quotients, as torchvision's ToTensor divides:
# XLA compiles x / 255 into x * (1 / 255), which is off in the last bit for about half of the levels.
UINT8_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)


class Statistics(NamedTuple):
    """Mean (d,) and covariance (d, d), float64, of a feature set."""

    mu: np.ndarray
    sigma: np.ndarray


def preprocess(images: jax.Array) -> jax.Array:
    """Steps 1-3: images (B, H, W, 3), uint8 or float in [0, 1] -> (B, 299, 299, 3) float32 in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (batch, height, width, 3), got shape {images.shape}")
    if images.dtype == jnp.uint8:
        x = jnp.asarray(UINT8_LEVELS)[images]
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = images.astype(jnp.float32)
    else:
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    x = jax.image.resize(x, (x.shape[0], RESOLUTION, RESOLUTION, 3), method="bilinear", antialias=False)
    return 2.0 * x - 1.0


class InceptionFeatures:
    """Pool3 features (N, 2048) of images, steps 1-4 of the protocol; a callable for ``fid``/``statistics_of``.

    ``images``: an array (N, H, W, 3), or an iterable of arrays, each one image (H, W, 3) or a batch
    (b, H, W, 3), so large sets stream (e.g. a generator over files) and sizes may differ between items.
    """

    def __init__(self, net: Net, params: PyTree, *, batch_size: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.net, self.batch_size = net, batch_size
        self.params = jax.device_put(params)  # once, not at every call
        self._preprocess = jax.jit(preprocess)  # one compilation per input size and dtype
        # The network sees only (batch_size, 299, 299, 3): it compiles once.
        self._pool3 = jax.jit(lambda params, x: net.apply(params, x, method="pool3"))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, batch_size: int = 50, matmul_precision: Any = "highest"
    ) -> InceptionFeatures:
        """From pytorch-fid's ``.pth`` (needs torch) or a converted ``.safetensors`` file."""
        from jdistill.convert.inception import load_inception

        net, params = load_inception(path, matmul_precision=matmul_precision)
        return cls(net, params, batch_size=batch_size)

    def __call__(self, images: Images) -> np.ndarray:
        outputs = []
        for batch in _batches(images, self.batch_size):
            n, pad = len(batch), self.batch_size - len(batch)
            if pad:  # a full batch, so the network's one compilation serves every call
                batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
            features = self._pool3(self.params, self._preprocess(batch))
            outputs.append(features[:n])  # still on the device: the next batch is dispatched meanwhile
        if not outputs:
            raise ValueError("no images")
        return np.concatenate([np.asarray(o) for o in outputs])


def _as_batch(item: Any) -> np.ndarray:
    """One image (H, W, 3) or batch (b, H, W, 3) as a uint8 or float32 batch, float values checked."""
    x = np.asarray(item)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (height, width, 3) or (batch, height, width, 3), got {x.shape}")
    return checked_images(x)


def _batches(images: Images, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of at most ``batch_size`` images of one shape and dtype, regrouped from the input's items."""
    if isinstance(images, np.ndarray | jax.Array):
        if np.ndim(images) != 4:
            raise ValueError(f"images must be (N, height, width, 3), got shape {np.shape(images)}")
        items: Iterable[Any] = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    else:
        items = images
    pending: list[np.ndarray] = []
    count, kind = 0, None
    for item in items:
        x = _as_batch(item)
        if pending and (x.shape[1:], x.dtype) != kind:  # a new size or dtype starts a new batch
            yield np.concatenate(pending)
            pending, count = [], 0
        kind = (x.shape[1:], x.dtype)
        start = 0
        while start < len(x):
            take = min(batch_size - count, len(x) - start)
            pending.append(x[start : start + take])
            count, start = count + take, start + take
            if count == batch_size:
                yield np.concatenate(pending)
                pending, count = [], 0
    if pending:
        yield np.concatenate(pending)


def statistics_of(images: Images, features: Callable[[Images], np.ndarray]) -> Statistics:
    """Steps 4-5: (mu, sigma) of ``features(images)`` (any extractor returning (N, d))."""
    return Statistics(*statistics(np.asarray(features(images))))


def save_statistics(path: str | os.PathLike, stats: tuple[np.ndarray, np.ndarray]) -> None:
    """Write (mu, sigma) as pytorch-fid's ``.npz`` (arrays ``mu`` and ``sigma``)."""
    mu, sigma = _checked_statistics(*stats, where=os.fspath(path))
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a path without it
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike) -> Statistics:
    """(mu, sigma) from an ``.npz`` file written by ``save_statistics`` or pytorch-fid."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no statistics file at {path}")
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}: expected arrays 'mu' and 'sigma', found {f.files}")
        return _checked_statistics(f["mu"], f["sigma"], where=path)


def _checked_statistics(mu: Any, sigma: Any, *, where: str) -> Statistics:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{where}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    return Statistics(mu, sigma)


def _statistics(x: Any, features: Callable[[Images], np.ndarray] | None) -> Statistics:
    if isinstance(x, str | os.PathLike):
        return load_statistics(x)
    if isinstance(x, tuple) and len(x) == 2 and np.ndim(x[0]) == 1 and np.ndim(x[1]) == 2:
        return _checked_statistics(*x, where="statistics")
    if features is None:
        raise ValueError("images were given but no feature extractor (e.g. InceptionFeatures.from_file)")
    return statistics_of(x, features)


def fid(
    a: Images | Statistics | str | os.PathLike,
    b: Images | Statistics | str | os.PathLike,
    features: Callable[[Images], np.ndarray] | None = None,
) -> float:
    """The Frechet distance between two sets, each given as images (see ``InceptionFeatures``), a (mu, sigma)
    pair or a path to an ``.npz`` statistics file; images are embedded by ``features`` (an
    ``InceptionFeatures`` for FID proper, or any extractor returning (N, d) features)."""
    return frechet_distance(*_statistics(a, features), *_statistics(b, features))


def read_images(path: str | os.PathLike, chunk: int = 64) -> Iterator[np.ndarray]:
    """The images of a folder or of a ``.npy`` file, as an iterable for ``InceptionFeatures``.

    A folder: its files with pytorch-fid's extensions (not recursive, sorted), decoded with Pillow and converted
    to RGB as pytorch-fid does, one uint8 (H, W, 3) array each. A ``.npy``: an array (N, H, W, 3), uint8 or float
    in [0, 1], memory-mapped and read ``chunk`` images at a time. The path is checked at once; images are read
    as the result is iterated.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
        if not names:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
        return _decoded(os.path.join(path, n) for n in names)
    if path.endswith(".npy") and os.path.isfile(path):
        array = np.load(path, mmap_mode="r")
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{path} must hold images (N, height, width, 3), got shape {array.shape}")
        return (np.asarray(array[i : i + chunk]) for i in range(0, len(array), chunk))
    raise ValueError(f"{path} is neither a folder of images nor a .npy file")


def _decoded(files: Iterable[str]) -> Iterator[np.ndarray]:
    from PIL import Image

    for file in files:
        with Image.open(file) as image:
            yield np.asarray(image.convert("RGB"))
