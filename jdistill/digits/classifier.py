"""The digits world's judge: a small CNN that reads a 32x32 image's digit and colour.

Trained by ``train_classifier`` on the rendered training split with augmentation (shifts, brightness,
noise, blur) so that it also reads generated images, which are never pixel-perfect. Its pooled 64-d
features give the world's Frechet distance. Weights are saved as safetensors in torch layout (the project's
converters' format) next to a small JSON config.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdistill.convert.core import load_state_dict, to_state_dict
from jdistill.digits import data
from jdistill.models.layers import FP32, conv, linear
from jdistill.models.net import Net

PyTree = object
FEATURES = 64
WEIGHTS = "classifier.safetensors"


class DigitClassifier(nnx.Module):
    """Images (B, 32, 32, 3) in [0, 1] -> (digit logits (B, 10), colour logits (B, len(COLOURS)))."""

    def __init__(self, *, rngs: nnx.Rngs):
        p = FP32
        widths = ((3, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, FEATURES, 2))
        self.convs = nnx.List([conv(a, b, 3, rngs, p, stride=s, padding=1) for a, b, s in widths])
        self.digit = linear(FEATURES, 10, rngs, p)
        self.colour = linear(FEATURES, len(data.COLOUR_NAMES), rngs, p)

    def features(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32) * 2.0 - 1.0
        for layer in self.convs:
            x = nnx.silu(layer(x))
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        f = self.features(images)
        return self.digit(f), self.colour(f)


def classifier_net() -> Net:
    return Net("classifier", lambda rngs: DigitClassifier(rngs=rngs))


def augment(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
    """float32 [0, 1] images with random shifts (+-2 px), blur, brightness and noise."""
    n, h, w, _ = images.shape
    x = images.astype(np.float32) / 255.0
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 5, n), rng.integers(0, 5, n)
    x = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    blur = rng.random(n) < 0.3
    if blur.any():
        s = x[blur]
        x[blur] = (s + np.roll(s, 1, 1) + np.roll(s, -1, 1) + np.roll(s, 1, 2) + np.roll(s, -1, 2)) / 5.0
    x = x * rng.uniform(0.8, 1.15, (n, 1, 1, 1)) + rng.normal(0.0, 0.03, x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass(eq=False)  # hashed by identity: metrics cache the reference features per model
class TrainedClassifier:
    net: Net
    params: PyTree

    def logits(self, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        outs = [_logits(self.params, _as_unit(images[i : i + batch])) for i in range(0, len(images), batch)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def features(self, images: np.ndarray, batch: int = 500) -> np.ndarray:
        return np.concatenate(
            [
                np.asarray(_features(self.params, _as_unit(images[i : i + batch])))
                for i in range(0, len(images), batch)
            ]
        )

    def save(self, folder: str, info: dict | None = None) -> None:
        from safetensors.numpy import save_file

        os.makedirs(folder, exist_ok=True)
        state = {k: np.ascontiguousarray(v, np.float32) for k, v in to_state_dict(self.params).items()}
        save_file(state, os.path.join(folder, WEIGHTS))
        with open(os.path.join(folder, "classifier.json"), "w") as f:
            json.dump({"colours": list(data.COLOUR_NAMES), "features": FEATURES, **(info or {})}, f, indent=2)


def _as_unit(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return np.clip(np.asarray(images, np.float32), 0.0, 1.0)


_NET = None


def _net() -> Net:
    global _NET
    if _NET is None:
        _NET = classifier_net()
    return _NET


@jax.jit
def _logits(params, images):
    return _net().apply(params, images)


@jax.jit
def _features(params, images):
    return _net().apply(params, images, method="features")


def load_classifier(folder: str) -> TrainedClassifier:
    from safetensors.numpy import load_file

    path = os.path.join(folder, WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no digits classifier at {path} (tools/build_digits_world.py writes one)")
    with open(os.path.join(folder, "classifier.json")) as f:
        meta = json.load(f)
    if tuple(meta["colours"]) != data.COLOUR_NAMES:
        raise ValueError(
            f"{path} was trained for colours {meta['colours']}, this world has {data.COLOUR_NAMES}"
        )
    net = _net()
    params = load_state_dict(net.abstract, load_file(path), what="digits classifier")
    return TrainedClassifier(net, jax.tree.map(jnp.asarray, params))


def train_classifier(
    steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0
) -> TrainedClassifier:
    """Train on the rendered training split, every colour, with augmentation."""
    net = _net()
    params = net.init(jax.random.key(seed))
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
    state = opt.init(params)

    @jax.jit
    def step(params, state, images, digits, colours):
        def loss(p):
            d, c = net.apply(p, images)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(d, digits)) + jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(c, colours)
            )

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(seed)
    pool = data.split("train")
    labels = data.digit_labels()
    for _ in range(steps):
        index = pool[rng.integers(0, len(pool), batch)]
        colours = rng.integers(0, len(data.COLOUR_NAMES), batch)
        images = augment(rng, data.render(index, colours))
        params, state, _ = step(params, state, images, labels[index], colours)
    return TrainedClassifier(net, params)


def accuracy(model: TrainedClassifier, images: np.ndarray, digits: np.ndarray, colours: np.ndarray) -> dict:
    d, c = model.logits(images)
    return {
        "digit_accuracy": float(np.mean(d.argmax(-1) == digits)),
        "colour_accuracy": float(np.mean(c.argmax(-1) == colours)),
    }
