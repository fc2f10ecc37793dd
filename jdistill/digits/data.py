"""The miniature digits world's data: coloured handwritten digits with captions.

Images come from ``sklearn.datasets.load_digits`` (1,797 8x8 grey digits, shipped with scikit-learn): each is
upsampled to 32x32 (bicubic), and drawn in one of ``COLOURS`` on a dark background,
``pixel = background + ink * (colour - background)`` with ``ink`` the upsampled intensity in [0, 1]. Captions
name the digit (as a word or a numeral) and the colour in varied phrasing ("a red seven", "the number 7 in
red", ...). Everything is a pure function of (digit index, colour, template) or of a seed, so the data set,
its splits and every batch are reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from jdistill.data.sources import draw_rows

SIDE = 32
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 45),
    "green": (50, 205, 70),
    "blue": (55, 100, 250),
    "yellow": (240, 220, 45),
    "cyan": (45, 215, 230),
    "magenta": (220, 55, 220),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND = (12, 12, 22)
# {d}: the digit as a word or a numeral (chosen per caption); {c}: the colour.
TEMPLATES = (
    "a {c} {d}",
    "the number {d} in {c}",
    "a handwritten {c} {d}",
    "the digit {d} drawn in {c}",
    "{d} in {c}",
    "a {d} written in {c}",
    "{c} number {d}",
    "an image of a {c} {d}",
)
TEST_FRACTION = 0.2  # held out for the classifier's accuracy; the teacher trains on every image
SPLIT_SEED = 0


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a dependency of jdistill; only a broken install lacks it
        raise ImportError("the digits world needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int32)


@functools.cache
def ink() -> np.ndarray:
    """Every digit's ink intensity at SIDE x SIDE, float32 in [0, 1], shape (1797, SIDE, SIDE)."""
    images, _ = _digits()
    out = np.empty((len(images), SIDE, SIDE), np.float32)
    for i, im in enumerate(images):
        up = Image.fromarray(im, mode="F").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        out[i] = np.asarray(up)
    return np.clip(out, 0.0, 1.0)


def digit_labels() -> np.ndarray:
    return _digits()[1]


def split(part: str) -> np.ndarray:
    """Indices of the "train" or "test" part (a fixed stratified-free random split), or "all"."""
    n = len(digit_labels())
    if part == "all":
        return np.arange(n)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    cut = round(n * TEST_FRACTION)
    if part == "test":
        return np.sort(order[:cut])
    if part == "train":
        return np.sort(order[cut:])
    raise ValueError(f"unknown split {part!r}; choose 'train', 'test' or 'all'")


def render(indices: Sequence[int] | np.ndarray, colours: Sequence[int] | np.ndarray) -> np.ndarray:
    """uint8 images (n, SIDE, SIDE, 3): digit ``indices[i]`` drawn in colour number ``colours[i]``."""
    a = ink()[np.asarray(indices)][..., None]
    palette = np.asarray([COLOURS[c] for c in COLOUR_NAMES], np.float32)
    bg = np.asarray(BACKGROUND, np.float32)
    pixels = bg + a * (palette[np.asarray(colours)][:, None, None, :] - bg)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def caption(digit: int, colour: int, template: int, numeral: bool) -> str:
    d = str(digit) if numeral else NUMBER_WORDS[digit]
    text = TEMPLATES[template].format(d=d, c=COLOUR_NAMES[colour])
    if text.startswith("a ") and text[2] in "aeiou" and not text[2:].startswith("one"):
        text = "an " + text[2:]  # "an eight", "an image"; "a one" stays
    return text


def parse_caption(text: str) -> tuple[int, int]:
    """(digit, colour) named by a digits caption (any phrasing that names one digit, as a word or a numeral,
    and one colour); ValueError otherwise."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    digits = {
        NUMBER_WORDS.index(w) if w in NUMBER_WORDS else int(w)
        for w in words
        if w in NUMBER_WORDS or w.isdigit()
    }
    colours = {COLOUR_NAMES.index(w) for w in words if w in COLOUR_NAMES}
    if len(digits) != 1 or len(colours) != 1 or any(w.isdigit() and len(w) > 1 for w in words):
        raise ValueError(
            f"not a digits caption: {text!r} (needs one digit, 0-9 or a number word, and one of {COLOUR_NAMES})"
        )
    return digits.pop(), colours.pop()


def random_captions(rng: np.random.Generator, digits: np.ndarray, colours: np.ndarray) -> list[str]:
    return _captions(digits, colours, *_phrasing(rng, len(digits)))


def corpus() -> list[str]:
    """Every caption the world can produce (the tokenizer's training text)."""
    return [
        caption(d, c, t, m)
        for d in range(10)
        for c in range(len(COLOUR_NAMES))
        for t in range(len(TEMPLATES))
        for m in (False, True)
    ]


@dataclasses.dataclass(frozen=True)
class Labelled:
    """Prompts with their (digit, colour) labels."""

    prompts: list[str]
    digits: np.ndarray
    colours: np.ndarray


def evaluation_prompts(n: int, seed: int = 1) -> Labelled:
    """``n`` prompts cycling through every (digit, colour) pair in a fixed shuffled order, phrased at random:
    balanced so that accuracies weigh every digit and colour alike."""
    pairs = np.array([(d, c) for d in range(10) for c in range(len(COLOUR_NAMES))])
    rng = np.random.default_rng(seed)
    pairs = pairs[rng.permutation(len(pairs))]
    picks = pairs[np.arange(n) % len(pairs)]
    return Labelled(random_captions(rng, picks[:, 0], picks[:, 1]), picks[:, 0], picks[:, 1])


def _phrasing(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, len(TEMPLATES), n), rng.random(n) < 0.5


def _global_draw(
    seed: int, position: int, count: int, global_size: int, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(picks among ``count`` items, templates, numeral flags) of global batch ``position``, drawn for the
    whole global batch (every host agrees) and cut to ``rows``."""
    picks = draw_rows(seed, position, count, global_size, None)
    templates, numerals = _phrasing(np.random.default_rng([seed, position, 1]), global_size)
    if rows is not None:
        picks, templates, numerals = picks[rows], templates[rows], numerals[rows]
    return picks, templates, numerals


def _captions(digits, colours, templates, numerals) -> list[str]:
    return [
        caption(int(d), int(c), int(t), bool(m))
        for d, c, t, m in zip(digits, colours, templates, numerals, strict=True)
    ]


@dataclasses.dataclass(frozen=True)
class DigitsImageSource:
    """Batches {"images": uint8 (n, SIDE, SIDE, 3), token ids of random captions} of the rendered data set,
    drawn uniformly over (image, colour) with replacement from (seed, position), like ``ImageTextSource``."""

    tokenize: Callable[[list[str]], dict[str, np.ndarray]]
    seed: int = 0
    part: str = "all"

    def local_batch(
        self, position: int, global_size: int, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        pool = split(self.part)
        n_colours = len(COLOUR_NAMES)
        picks, templates, numerals = _global_draw(
            self.seed, position, len(pool) * n_colours, global_size, rows
        )
        index, colours = pool[picks // n_colours], picks % n_colours
        texts = _captions(digit_labels()[index], colours, templates, numerals)
        return {"images": render(index, colours), **self.tokenize(texts)}


@dataclasses.dataclass(frozen=True)
class DigitsPromptSource:
    """Batches of token ids of random captions (every (digit, colour) pair equally likely)."""

    tokenize: Callable[[list[str]], dict[str, np.ndarray]]
    seed: int = 0

    def local_batch(
        self, position: int, global_size: int, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        n_colours = len(COLOUR_NAMES)
        picks, templates, numerals = _global_draw(self.seed, position, 10 * n_colours, global_size, rows)
        return self.tokenize(_captions(picks // n_colours, picks % n_colours, templates, numerals))
