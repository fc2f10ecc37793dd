"""CLIP score: how well images match their prompts, measured by a CLIP model (transformers or OpenCLIP weights).

The protocol is torchmetrics' ``CLIPScore`` (transformers' ``CLIPModel`` + ``CLIPProcessor``, the number most
text-to-image papers report), step by step:

1. Images: (N, H, W, 3), uint8 or float in [0, 1]; floats are rounded to 8-bit levels first, as an image saved
   to PNG (or handed to torchmetrics as uint8) is.
2. Resize so that the short side is the vision tower's ``image_size`` and the long side
   ``int(image_size * long / short)``, by bicubic interpolation as PIL does it on 8-bit images: Keys' cubic with
   a = -0.5, widened (antialiased) when shrinking, a width pass then a height pass, each rounded and clipped to
   0..255. Centre-crop to image_size x image_size at offsets ``(H' - size) // 2``, ``(W' - size) // 2``
   (transformers'; torchvision rounds instead). Scale to [0, 1], normalise with CLIP's mean (0.48145466,
   0.4578275, 0.40821073) and std (0.26862954, 0.26130258, 0.27577711). On uint8 images this reproduces
   transformers' (PIL) ``CLIPImageProcessor`` to within 2 levels of 255 on under 2% of the values (the rest
   exactly), measured in tests/test_clip_score.py.
3. Prompts: tokenised by the ``CLIPTokenizer`` shipped with the weights, padded to and truncated at the text
   tower's ``max_position_embeddings`` (77). Truncation keeps the end-of-text token; torchmetrics instead cuts
   the ids after 77 (and warns), so prompts longer than that score differently there.
4. Per pair: ``s_i = 100 * cos(E_I(image_i), E_T(prompt_i))``, with E the projected, unnormalised embeddings
   (``get_image_features`` / ``get_text_features``).
5. CLIP score = ``max(mean_i s_i, 0)``: torchmetrics' computation. (Its docstring writes ``max(100 cos, 0)``
   per pair, the CLIP-S of Hessel et al. up to their weight 2.5; ``clamp="pair"`` computes that. The two
   differ only when some cosine is negative, which is rare for matched image-prompt pairs.)

Everything after tokenisation runs under one ``jax.jit`` per batch shape; the last batch is padded to the batch
size so that a run compiles once per image size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill.convert.clip_model import load_clip
from jdistill.evaluate.images import checked_images
from jdistill.models.clip_vision import CLIPConfig, l2_normalize
from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net

PyTree = Any
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLAMPS = ("mean", "pair")
# Float images outside [0, 1] by more than this are taken for a mistake (e.g. [-1, 1] VAE outputs).


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(H', W') with the short side ``size`` and the long side truncated, as transformers and torchvision."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _pil_pass(x: jax.Array, axis: int, length: int) -> jax.Array:
    shape = list(x.shape)
    shape[axis] = length
    # jax's "bicubic" is Keys' a = -0.5 kernel, scaled with the step when shrinking (antialias): PIL's filter.
    y = jax.image.resize(x, tuple(shape), method="bicubic", antialias=True)
    return jnp.clip(jnp.round(y), 0.0, 255.0)  # PIL stores each pass in 8 bits


def preprocess(images: jax.Array, size: int) -> jax.Array:
    """CLIP's pixel values (B, size, size, 3), float32, from images (B, H, W, 3): uint8, or float in [0, 1].
    Steps 1-2 of the module docstring; jittable (the output size depends on the static input shape only)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (batch, height, width, 3), got shape {images.shape}")
    x = images.astype(jnp.float32)
    if not jnp.issubdtype(images.dtype, jnp.integer):
        x = jnp.clip(jnp.round(x * 255.0), 0.0, 255.0)
    _, h, w, _ = images.shape
    new_h, new_w = resized_size(h, w, size)
    if new_w != w:  # PIL skips a pass whose size does not change
        x = _pil_pass(x, 2, new_w)
    if new_h != h:
        x = _pil_pass(x, 1, new_h)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, top : top + size, left : left + size] / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def pair_scores(
    net: Net, params: PyTree, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None
) -> jax.Array:
    """(B,) 100 * cos(image_i, prompt_i) from preprocessed pixel values (NHWC) and token ids."""
    model = nnx.merge(net.graphdef, params)
    image = l2_normalize(model.get_image_features(pixel_values))
    text = l2_normalize(model.get_text_features(input_ids, attention_mask))
    return 100.0 * jnp.sum(image * text, axis=-1)


def aggregate(scores: np.ndarray, clamp: str = "mean") -> float:
    """The CLIP score of per-pair scores: max(mean, 0) (torchmetrics) or mean of max(s_i, 0) (``"pair"``)."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or not len(scores):
        raise ValueError(f"need a non-empty vector of per-pair scores, got shape {scores.shape}")
    if clamp == "mean":
        return max(float(scores.mean()), 0.0)
    if clamp == "pair":
        return float(np.maximum(scores, 0.0).mean())
    raise ValueError(f"unknown clamp {clamp!r}; choose one of {CLAMPS}")


class CLIPScore:
    """The CLIP score of images against prompts, with the protocol of the module docstring.

    >>> metric = CLIPScore.from_pretrained("/models/clip-vit-large-patch14")   # doctest: +SKIP
    >>> metric(images, prompts)                                                  # doctest: +SKIP
    """

    def __init__(self, net: Net, params: PyTree, tokenizer: Any, *, batch_size: int = 32):
        if not isinstance(net.config, CLIPConfig):
            raise ValueError("CLIPScore needs a CLIPModel Net (jdistill.convert.clip_model)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.net, self.tokenizer, self.batch_size = net, tokenizer, batch_size
        self.image_size = net.config.vision_config.image_size
        self.max_length = net.config.text_config.max_position_embeddings
        vocab = net.config.text_config.vocab_size
        if len(tokenizer) > vocab:  # out-of-range ids would be silently clamped by the embedding gather
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text tower only {vocab}")
        self.params = jax.device_put(params)  # once, not at every call
        size = self.image_size

        def run(params, images, input_ids, attention_mask):
            return pair_scores(net, params, preprocess(images, size), input_ids, attention_mask)

        self._run = jax.jit(run)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        tokenizer: str | Any | None = None,
        open_clip_model_config: CLIPConfig | dict | None = None,
        batch_size: int = 32,
        precision: Precision = FP32,
        allow_pickle: bool = False,
    ) -> CLIPScore:
        """From a folder in transformers' layout (config.json + model.safetensors) or OpenCLIP's
        (``jdistill.convert.clip_model.load_clip``), with the tokenizer files in the same folder unless
        ``tokenizer`` (a folder or a tokenizer) is given."""
        net, params = load_clip(
            path,
            open_clip_model_config=open_clip_model_config,
            precision=precision,
            allow_pickle=allow_pickle,
        )
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = _load_tokenizer(tokenizer or path)
        return cls(net, params, tokenizer, batch_size=batch_size)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), (N, max_position_embeddings) int32 (step 3 of the protocol)."""
        out = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="np",
        )
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    def scores(self, images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """(N,) per-pair scores 100 * cos, unclamped. ``images``: (N, H, W, 3) or N arrays (H, W, 3) (sizes
        may differ between them; each size compiles once)."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, one per image, not one string")
        images = list(images) if not isinstance(images, np.ndarray) else images
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: they are scored in pairs")
        if not len(prompts):
            raise ValueError("no images to score")
        ids, mask = self.tokenize(prompts)
        out = np.empty(len(prompts), np.float64)
        for index in _groups(images).values():
            for start in range(0, len(index), self.batch_size):
                rows = index[start : start + self.batch_size]
                chunk = (
                    images[rows] if isinstance(images, np.ndarray) else np.stack([images[i] for i in rows])
                )
                out[rows] = self._batch(checked_images(chunk), ids[rows], mask[rows])
        return out

    def __call__(
        self, images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str], clamp: str = "mean"
    ) -> float:
        """The CLIP score (step 5 of the protocol)."""
        return aggregate(self.scores(images, prompts), clamp)

    def _batch(self, images: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        n, pad = len(images), self.batch_size - len(images)
        if pad:  # a full batch: one compilation per image size
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            ids, mask = (np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) for a in (ids, mask))
        return np.asarray(self._run(self.params, images, ids, mask))[:n]


def _groups(images: np.ndarray | list[np.ndarray]) -> dict[tuple[int, ...], np.ndarray]:
    """Indices of the images of each shape, in order."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, height, width, 3), got shape {images.shape}")
        return {images.shape[1:]: np.arange(len(images))}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        if np.ndim(image) != 3:
            raise ValueError(f"each image must be (height, width, 3), got shape {np.shape(image)}")
        groups.setdefault(np.shape(image), []).append(i)
    return {k: np.asarray(v) for k, v in groups.items()}


def _load_tokenizer(path: str) -> Any:
    from transformers import CLIPTokenizer

    # transformers builds an empty tokenizer from a folder without vocabulary files instead of failing.
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("vocab.json", "tokenizer.json")):
        raise ValueError(
            f"no CLIP tokenizer (vocab.json + merges.txt) in {path}; pass tokenizer= (a folder or a tokenizer)"
        )
    return CLIPTokenizer.from_pretrained(path)
