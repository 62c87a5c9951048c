"""Prompt lists: plain text, JSON lines (public memorised-prompt lists), ``;``-CSV (NeMo)."""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import pandas as pd

from diffmem.checks import check_positive
from diffmem.data.images import _read_table, check_regular
from diffmem.errors import ConfigError, DataError
from diffmem.runs import require

log = logging.getLogger(__name__)
FORMATS = ("txt", "jsonl", "csv")


def _blank(caption) -> bool:
    """Whether a caption is empty once whitespace, control and format characters (NUL,
    zero-width spaces and joiners, BOM) are dropped: nothing a tokenizer would see."""
    if not isinstance(caption, str):
        return True
    return not "".join(c for c in caption if unicodedata.category(c) not in ("Cc", "Cf")).strip()


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ConfigError(f"prompts.format '{fmt}' is not one of auto, {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    return {"json": "jsonl", "jsonl": "jsonl", "csv": "csv", "txt": "txt"}.get(suffix, "txt")


def read_prompt_file(path: str | Path, fmt: str = "auto") -> pd.DataFrame:
    """``prompt_id, caption`` plus whatever the file carries (index, url, type, max_sscd...)."""
    path = Path(path)
    fmt = _format_of(path, fmt)
    check_regular(path)
    if fmt == "txt":
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a leading BOM is dropped
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        kept = [(n, s.strip()) for n, s in enumerate(lines, 1) if s.strip()]
        df = pd.DataFrame({"caption": [s for _, s in kept]})
        linenos = [n for n, _ in kept]
    else:
        native = path.suffix.lower().lstrip(".") in ({"jsonl", "json"} if fmt == "jsonl" else {"csv"})
        df = _normalise(_read_table(path) if native else _read_as(path, fmt), path)
        linenos = range(2 if fmt == "csv" else 1, len(df) + 3)  # CSV has a header line
    if df.empty:
        raise DataError(f"{path}: the prompt list is empty")
    blank = df["caption"].map(_blank)
    if blank.any():
        raise DataError(f"{path}: line {linenos[int(blank.values.argmax())]}: empty caption "
                        "(nothing but whitespace, control or zero-width characters)")
    df.insert(0, "prompt_id", range(len(df)))
    return df.reset_index(drop=True)


def _read_as(path: Path, fmt: str) -> pd.DataFrame:
    """Read a file whose suffix does not say its format."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        alias = Path(tmp) / f"prompts.{fmt}"
        shutil.copyfile(path, alias)
        try:
            return _read_table(alias)
        except DataError as err:
            raise DataError(str(err).replace(str(alias), str(path))) from err


def _normalise(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    if table.empty and not len(table.columns):
        raise DataError(f"{path}: the prompt list is empty")
    cols = {c.lower(): c for c in table.columns}
    if "caption" not in cols and "prompt" not in cols and "text" not in cols:
        raise DataError(f"{path}: no 'caption' column (found: {', '.join(map(str, table.columns)) or 'none'})")
    key = cols.get("caption") or cols.get("prompt") or cols["text"]
    for row, value in enumerate(table[key], 1):
        if not (isinstance(value, str) or (pd.api.types.is_scalar(value) and pd.isna(value))):
            raise DataError(f"{path}: row {row}: the caption is {type(value).__name__} {value!r}, "
                            "not a string")
    out = pd.DataFrame({"caption": table[key].where(table[key].isna(), table[key].astype(str))})
    for name in ("index", "url", "type", "max_sscd", "mean_sscd"):
        if name in cols:
            out[name] = table[cols[name]].values
    for name in ("max_sscd", "mean_sscd"):
        if name in out:
            out[name] = pd.to_numeric(out[name].replace("", None), errors="coerce")
    return out


def warn_long_prompts(captions, tokenizer) -> int:
    """Warn once, with the count, when captions are longer than ``tokenizer`` takes (the text
    encoder sees them cut); returns that count."""
    limit = int(tokenizer.model_max_length)
    captions = list(captions)
    n = sum(len(ids) > limit for ids in tokenizer(captions, truncation=False, verbose=False)["input_ids"])
    if n:
        log.warning("%d of %d prompts are longer than the tokenizer's %d tokens; the text encoder "
                    "sees them cut", n, len(captions), limit)
    return n


def prompts_from_testbed(manifest: pd.DataFrame, n_ordinary: int = 16, n_heldout: int = 16,
                    seed: int = 0) -> pd.DataFrame:
    """Every canary/template caption, some trained ordinary captions and unseen held-out ones."""
    first = manifest.drop_duplicates("caption")
    special = first[first["kind"].isin(["canary", "template"])]
    ordinary = first[first["kind"] == "ordinary"]
    trained = set(manifest.loc[manifest["split"] == "train", "caption"])
    heldout = first[(first["kind"] == "heldout") & ~first["caption"].isin(trained)]
    parts = [special,
             ordinary.sample(min(n_ordinary, len(ordinary)), random_state=seed),
             heldout.sample(min(n_heldout, len(heldout)), random_state=seed)]
    df = pd.concat(parts)[["caption", "kind", "group", "dup_count", "image_id", "file"]]
    df = df.rename(columns={"image_id": "target_id", "file": "target_file"})
    df.insert(0, "prompt_id", range(len(df)))
    return df.reset_index(drop=True)


def load_prompts(cfg, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The prompt table for a ``prompts`` config."""
    if cfg.kind == "testbed":
        if manifest is None:
            raise ConfigError("prompts=testbed needs the testbed dataset (data=testbed)")
        return prompts_from_testbed(manifest, cfg.n_ordinary, cfg.n_heldout)
    if cfg.kind == "file":
        require(cfg, "path", prefix="prompts.", hint="prompts=file needs prompts.path=<prompt list>")
        limit = check_positive(cfg.get("limit"), "prompts.limit", optional=True)
        df = read_prompt_file(cfg.path, cfg.get("format", "auto"))
        return df.head(int(limit)) if limit is not None else df
    raise ConfigError(f"prompts.kind '{cfg.kind}' is not one of testbed, file")
