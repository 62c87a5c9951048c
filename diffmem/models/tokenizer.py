"""A CLIP tokenizer built offline from the BPE vocabulary that open_clip ships."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.runs import atomic_path

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_vocab(out_dir: str | Path, bpe_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (HF CLIP format) from open_clip's BPE file."""
    if bpe_path is None:
        from open_clip.tokenizer import default_bpe

        bpe_path = default_bpe()
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    with atomic_path(vocab_file) as tmp:
        tmp.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    with atomic_path(merges_file) as tmp:
        tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def build_clip_tokenizer(work_dir: str | Path) -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` equivalent to SD's, built with no download."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_vocab(work_dir)
    return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77)
