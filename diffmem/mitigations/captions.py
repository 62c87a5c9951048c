"""Caption-level randomisation (Somepalli et al. 2023) shared by training and inference.

Each function takes a numpy ``Generator`` so every sample's randomness comes from its own
seed. ``MC`` picks one of several captions of the image, ``RC`` replaces the caption by random
words, ``RT`` inserts random words, ``CWR`` repeats caption words. Random words come from the
model's own tokenizer vocabulary (whole-word BPE entries), so no word list is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from diffmem.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

AUGMENTATIONS = ("mc", "rc", "rt", "cwr")


def word_pool(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Alphabetic whole-word entries of a CLIP-style BPE vocabulary (sorted, so seeded draws repeat)."""
    words = sorted({t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha()})
    if not words:
        raise ConfigError("the tokenizer vocabulary has no whole-word entries to draw random tokens from")
    return words


def insert_random_words(caption: str, pool: Sequence[str], n: int, rng: np.random.Generator) -> str:
    """RT: ``n`` random words inserted at random positions."""
    words = caption.split()
    for _ in range(int(n)):
        words.insert(int(rng.integers(len(words) + 1)), pool[int(rng.integers(len(pool)))])
    return " ".join(words)


def random_caption(caption: str, pool: Sequence[str], rng: np.random.Generator) -> str:
    """RC: as many random words as the caption has."""
    return " ".join(pool[int(i)] for i in rng.integers(len(pool), size=max(1, len(caption.split()))))


def repeat_words(caption: str, n: int, rng: np.random.Generator) -> str:
    """CWR: ``n`` of the caption's words repeated, each inserted at a random position."""
    words = caption.split()
    if not words:
        return caption
    for _ in range(int(n)):
        words.insert(int(rng.integers(len(words) + 1)), words[int(rng.integers(len(words)))])
    return " ".join(words)


_INVERSE = {"above": "below", "left of": "right of"}
_SYNONYMS = {"emblem": ("logo", "badge", "sign"), "poster": ("placard", "print", "flyer")}


def testbed_alternatives(caption: str) -> list[str]:
    """Other captions of the same testbed image (the testbed's stand-in for BLIP captions).

    Scenes: the relation inverted ("a red circle above a blue square" -> "a blue square
    below a red circle"); canaries and templates: the noun replaced by synonyms. Always
    includes ``caption`` itself.
    """
    out = [caption]
    m = re.fullmatch(r"a (\w+ \w+) (above|left of) a (\w+ \w+)", caption)
    if m:
        out.append(f"a {m.group(3)} {_INVERSE[m.group(2)]} a {m.group(1)}")
        out.append(f"{m.group(1)} {m.group(2)} {m.group(3)}")
    m = re.fullmatch(r"(the|a) (\w+) (emblem|poster)", caption)
    if m:
        out += [f"{m.group(1)} {m.group(2)} {s}" for s in _SYNONYMS[m.group(3)]]
    return out


def augmenter(
    kind: str,
    p: float,
    pool: Sequence[str],
    n_words: int = 2,
    alternatives: Callable[[str], list[str]] = testbed_alternatives,
) -> Callable:
    """``fn(captions, rng) -> captions``: each caption is changed by ``kind`` with probability ``p``."""
    if kind not in AUGMENTATIONS:
        raise ConfigError(f"mitigation.augment.kind '{kind}' is not one of {', '.join(AUGMENTATIONS)}")
    if not 0 <= float(p) <= 1:
        raise ConfigError(f"mitigation.augment.p must be in [0, 1] (got {p})")

    def change(c: str, rng: np.random.Generator) -> str:
        if kind == "mc":
            options = alternatives(c)
            return options[int(rng.integers(len(options)))]
        if kind == "rc":
            return random_caption(c, pool, rng)
        if kind == "rt":
            return insert_random_words(c, pool, n_words, rng)
        return repeat_words(c, n_words, rng)

    def fn(captions: Sequence[str], rng: np.random.Generator) -> list[str]:
        hit = rng.random(len(captions)) < float(p)
        return [change(c, rng) if h else c for c, h in zip(captions, hit)]

    return fn
