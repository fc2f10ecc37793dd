"""The digits world's data, captions and tokenizer (no trained model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from jdistill.digits import data
from jdistill.digits.tokenizer import MAX_LENGTH, learn_merges, write_tokenizer


def test_images_are_the_sklearn_digits_upsampled_and_coloured():
    from sklearn.datasets import load_digits

    raw = load_digits()
    index = np.array([0, 5, 100])
    colours = np.array([0, 2, 5])
    images = data.render(index, colours)
    assert images.shape == (3, data.SIDE, data.SIDE, 3) and images.dtype == np.uint8
    for img, i, c in zip(images, index, colours, strict=True):
        # Corners are background (digits are centred with blank borders in the 8x8 originals).
        np.testing.assert_allclose(img[0, 0], data.BACKGROUND, atol=2)
        # The brightest pixel is (close to) the colour: full ink in the upsampled digit.
        target = np.asarray(data.COLOURS[data.COLOUR_NAMES[c]], np.float32)
        brightest = img.reshape(-1, 3)[np.argmax(img.reshape(-1, 3).sum(1))].astype(np.float32)
        assert np.abs(brightest - target).max() < 25
        # Downsampling back to 8x8 recovers the original digit's shape.
        ink = (img.astype(np.float32) - data.BACKGROUND) / (target - data.BACKGROUND)
        small = ink.mean(-1).reshape(8, 4, 8, 4).mean((1, 3))
        original = raw.images[i] / 16.0
        assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.95


def test_captions_name_the_digit_and_the_colour():
    words = {w: d for d, w in enumerate(data.NUMBER_WORDS)} | {str(d): d for d in range(10)}
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 10, 200)
    colours = rng.integers(0, len(data.COLOUR_NAMES), 200)
    for text, d, c in zip(data.random_captions(rng, digits, colours), digits, colours, strict=True):
        tokens = text.split()
        assert [words[t] for t in tokens if t in words] == [d], text
        assert [t for t in tokens if t in data.COLOURS] == [data.COLOUR_NAMES[c]], text
    templates = {data.caption(3, 0, t, False) for t in range(len(data.TEMPLATES))}
    assert len(templates) == len(data.TEMPLATES)  # varied phrasing


def test_splits_partition_the_digits():
    train, test = data.split("train"), data.split("test")
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(data.digit_labels()) == 1797
    assert abs(len(test) / 1797 - data.TEST_FRACTION) < 0.01
    with pytest.raises(ValueError, match="unknown split"):
        data.split("val")


def test_evaluation_prompts_are_balanced_over_digit_and_colour_pairs():
    p = data.evaluation_prompts(120)
    pairs = np.stack([p.digits, p.colours], 1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    assert len(counts) == 60 and (counts == 2).all()
    assert data.evaluation_prompts(120).prompts == p.prompts  # deterministic


@pytest.mark.parametrize("kind", ["images", "prompts"])
def test_batches_are_a_function_of_seed_and_position_and_agree_across_hosts(kind):
    make = data.DigitsImageSource if kind == "images" else data.DigitsPromptSource
    src = make(lambda texts: {"input_ids": np.array([[hash(t) % 1000] for t in texts])}, seed=3)
    full = src.local_batch(5, 16)
    again = src.local_batch(5, 16)
    rows = np.array([3, 4, 11])
    part = src.local_batch(5, 16, rows)
    for k in full:
        np.testing.assert_array_equal(full[k], again[k])
        np.testing.assert_array_equal(full[k][rows], part[k])
    other = src.local_batch(6, 16)
    assert not np.array_equal(full["input_ids"], other["input_ids"])


def test_bpe_merges_make_every_caption_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizer(str(tmp_path))
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    words = sorted({w for text in data.corpus() for w in text.split()})
    for w in words:
        ids = tok(w)["input_ids"]
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))  # start, the word, end
    # Unknown words still tokenize (letter by letter, no unknown token), and captions fit MAX_LENGTH.
    ids = tok("a purple elephant")["input_ids"]
    assert tok.unk_token_id not in ids[1:-1] and len(ids) > 5
    assert max(len(tok(t)["input_ids"]) for t in data.corpus()) <= MAX_LENGTH
    assert tok("")["input_ids"] == [tok.bos_token_id, tok.eos_token_id]


def test_learn_merges_is_bpe():
    # Hand-checked: "aab" x2, "ab" x1 -> pair counts (a, a) 2, (a, b</w>) 3: merge "a b</w>" first.
    merges = learn_merges(["aab", "aab", "ab"])
    assert merges[0] == ("a", "b</w>")
    assert merges[1] == ("a", "ab</w>")
    assert len(merges) == 2


def test_every_caption_parses_back_to_its_digit_and_colour():
    for d in range(10):
        for c in range(len(data.COLOUR_NAMES)):
            for t in range(len(data.TEMPLATES)):
                for numeral in (False, True):
                    assert data.parse_caption(data.caption(d, c, t, numeral)) == (d, c)
    assert data.parse_caption("Seven, in RED.") == (7, 0)
    for bad in ("a red 17", "a red blue seven", "a red three and a four", "seven", "a photo of a cat"):
        with pytest.raises(ValueError, match="not a digits caption"):
            data.parse_caption(bad)
