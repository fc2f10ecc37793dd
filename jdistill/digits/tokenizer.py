"""The digits world's CLIP tokenizer: CLIP's byte-level BPE with a vocabulary learnt from the captions.

The vocabulary holds CLIP's 256 byte symbols and their end-of-word forms (so any text tokenizes, unknown
words letter by letter), the merges a BPE learns on the caption corpus until every caption word is one token,
and CLIP's two special tokens. Written as ``vocab.json`` + ``merges.txt`` for transformers' ``CLIPTokenizer``.
"""

from __future__ import annotations

import collections
import itertools
import json
import os

from jdistill.digits.data import corpus

START, END = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # the longest caption is 8 words; with start and end tokens 10


def byte_symbols() -> list[str]:
    """GPT-2 / CLIP's reversible map of the 256 bytes to printable characters, in byte order of the table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = dict(zip(printable, printable, strict=True))
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return [chr(table[b]) for b in range(256)]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE over the word counts of ``words`` (CLIP's end-of-word marker on the last symbol) until every word is
    one symbol; ties broken by the pair's text so the result does not depend on dictionary order."""
    counts = collections.Counter(words)
    split = {w: (*w[:-1], w[-1] + "</w>") for w in counts}
    merges = []
    while True:
        pairs = collections.Counter()
        for w, parts in split.items():
            for pair in itertools.pairwise(parts):
                pairs[pair] += counts[w]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, parts in split.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = tuple(out)


def write_tokenizer(folder: str) -> None:
    """A ``tokenizer/`` folder (vocab.json, merges.txt, configs) that ``CLIPTokenizer.from_pretrained`` loads."""
    words = " ".join(corpus()).split()
    merges = learn_merges(words)
    symbols = byte_symbols()
    vocab = [*symbols, *(s + "</w>" for s in symbols)]
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    vocab += [START, END]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": START,
        "eos_token": END,
        "unk_token": END,
        "pad_token": END,
        "do_lower_case": True,
        "errors": "replace",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=2)
