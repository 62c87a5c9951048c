"""Checks of what a user's data files say, shared by every dataset layout and prompt list:
captions are non-blank strings, and paths stay inside ``data.root``."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffmem.errors import DataError


def blank_caption(caption: str) -> bool:
    """Whether a caption is empty once whitespace, control and format characters (NUL,
    zero-width spaces and joiners, BOM) are dropped: nothing a tokenizer would see."""
    return not "".join(c for c in caption if unicodedata.category(c) not in ("Cc", "Cf")).strip()


def caption_problem(value: object) -> str | None:
    """Why ``value`` is no caption (not a string: a list, bytes, a number, null; or blank), or None."""
    if not isinstance(value, str):
        if value is None or pd.api.types.is_scalar(value) and pd.isna(value):
            return "the caption is missing (null)"
        kind = "list" if isinstance(value, (list, tuple, np.ndarray)) else type(value).__name__
        return f"the caption is {kind} {str(value)[:60]!r}, not a string"
    if blank_caption(value):
        return "empty caption (nothing but whitespace, control or zero-width characters)"
    return None


def check_captions(captions: Iterable[object], where: str, rows: Sequence[object] | None = None) -> None:
    """Refuse the first caption of ``captions`` that is not a non-blank string, naming ``where``
    and its row (``rows``: a label per caption, else ``row <1-based index>``): a caption is a
    prompt (``prompts=dataset``), and ``str()`` of a list or of null is none."""
    values = pd.Series(captions, dtype=object).reset_index(drop=True)
    # a string with a word character is never blank: only the others are looked at closely
    text = values.map(lambda v: isinstance(v, str))
    fine = text & values.where(text, "").str.contains(r"\w", regex=True)
    for i in np.flatnonzero(~fine.values):
        why = caption_problem(values[i])
        if why is not None:
            raise DataError(f"{where}: {rows[int(i)] if rows is not None else f'row {i + 1}'}: {why}")


def leads_outside(root: Path, rel: str | Path, resolve: bool = True) -> bool:
    """Whether ``rel`` (a path a user gave, relative to ``root``) leads outside ``root``: an
    absolute path, a ``..`` or (with ``resolve``) a symlink out. The one containment rule of
    every user path (manifest rows, img2dataset keys, shard globs, prompt lists' ``target_file``)."""
    rel = Path(rel)
    if rel.is_absolute() or ".." in rel.parts:
        return True
    return resolve and not (root / rel).resolve().is_relative_to(root.resolve())


def check_inside(root: str | Path, rel: str | Path, where: str, allow_outside_root: bool = False) -> None:
    """Refuse ``rel`` when it :func:`leads_outside` ``root`` (unless ``allow_outside_root``)."""
    if not allow_outside_root and leads_outside(Path(root), rel):
        raise DataError(f"{where}'{rel}' is outside data.root {root} (set data.allow_outside_root=true to read it)")
