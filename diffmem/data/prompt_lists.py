"""Prompt lists as researchers store them, mapped to one ground-truth vocabulary.

Every column of a prompt list is kept. The known schemas' ground truth becomes two columns:

- ``memorisation_type``: ``verbatim``, ``template`` or ``none`` (NaN: unknown). From a
  ``memorisation_type`` column as is, NeMo's ``type`` (VM, TM, N) or Webster et al.'s
  ``overfit_type`` (MV and RV verbatim, TV template, N none).
- ``is_memorised``: True / False (NaN: unknown). From a file's ``label`` (``positive``: Wen
  et al.'s list, NeMo's memorised file; ``negative``: NeMo's unmemorised file), else from
  ``memorisation_type``.

Testbed prompts keep ``kind`` / ``dup_count``; :func:`diffmem.data.labels.ground_truth_labels`
maps them with the ``positives`` config. Also here: the prompts of a dataset's own captions
(``prompts=dataset``) and the line numbers of a file's records (for errors).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffmem.data.labels import TYPES
from diffmem.errors import ConfigError, DataError

log = logging.getLogger(__name__)
LABELS = ("positive", "negative")
#: schema column -> its values in the vocabulary of :data:`TYPES`
SCHEMAS = {
    "type": {"VM": "verbatim", "TM": "template", "N": "none"},  # NeMo
    "overfit_type": {"MV": "verbatim", "RV": "verbatim", "TV": "template", "N": "none"},
}  # Webster


def record_lines(path: Path, fmt: str) -> list[int]:
    """The 1-based line on which each record of a prompt file starts (a row number for Parquet).

    CSV/TSV records may span lines (quoted newlines in captions); blank lines of text and
    JSON-lines files hold no record.
    """
    if fmt == "parquet":
        return list(range(1, len(pd.read_parquet(path, columns=[])) + 1))
    if fmt in ("csv", "tsv"):
        with open(path, encoding="utf-8-sig", newline="") as fh:
            head = fh.readline()
            fh.seek(0)
            sep = "\t" if fmt == "tsv" else (";" if head.count(";") > head.count(",") else ",")
            reader, starts = csv.reader(fh, delimiter=sep), []
            next(reader, None)  # the header
            end = reader.line_num
            for row in reader:
                if row:
                    starts.append(end + 1)
                end = reader.line_num
            return starts
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    return [i + 1 for i, line in enumerate(lines) if line.strip()]


def with_ground_truth(df: pd.DataFrame, path: Path, label: str | None = None) -> pd.DataFrame:
    """``df`` plus ``memorisation_type`` / ``is_memorised`` from its known schema and ``label``."""
    if label is not None and label not in LABELS:
        raise ConfigError(f"prompts.files: label '{label}' of {path} is not one of {', '.join(LABELS)} (or null)")
    out = df.copy()
    if "memorisation_type" in out:
        types = out["memorisation_type"].where(out["memorisation_type"].notna())
        values = types.dropna().astype(str).str.lower()
        bad = sorted(set(values) - set(TYPES))
        if bad:
            raise DataError(f"{path}: memorisation_type '{bad[0]}' is not one of {', '.join(TYPES)}")
        out["memorisation_type"] = types.where(types.isna(), types.astype(str).str.lower())
    else:
        col = next((c for c in SCHEMAS if c in out), None)
        if col is not None:
            raw = out[col].where(out[col].notna())
            values = raw.astype(str).str.strip().str.upper()
            known = values.isin(list(SCHEMAS[col]))
            bad = raw.notna() & ~known & (values != "")
            if bad.any():
                raise DataError(
                    f"{path}: {col} '{raw[bad].iloc[0]}' is not one of "
                    f"{', '.join(SCHEMAS[col])} (row {int(np.argmax(bad.values)) + 1})"
                )
            out["memorisation_type"] = values.map(SCHEMAS[col]).where(known)
    if label is not None:
        if "memorisation_type" in out:  # the explicit label wins over the file's column, said once
            t = out["memorisation_type"]
            clash = (t != "none") & t.notna() if label == "negative" else t == "none"
            if clash.any():
                log.warning(
                    "%s: prompts label=%s overrides the file's memorisation type of %d of %d rows (first: %r is %s)",
                    path,
                    label,
                    int(clash.sum()),
                    len(out),
                    out["caption"][clash].iloc[0],
                    t[clash].iloc[0],
                )
                out["memorisation_type"] = t.where(~clash, "none" if label == "negative" else np.nan)
        elif label == "negative":
            out["memorisation_type"] = "none"
        out["is_memorised"] = label == "positive"
    elif "memorisation_type" in out:
        t = out["memorisation_type"]
        out["is_memorised"] = (t != "none").where(t.notna())
    return out


def check_files(files: Iterable[Any]) -> list[dict]:
    """``prompts.files`` as ``[{path, label}]``: each entry a mapping with a ``path``."""
    out = []
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or not entry.get("path"):
            raise ConfigError(
                f"prompts.files[{i}]: expected {{path: <file>, label: positive|negative|null}} (got {entry!r})"
            )
        unknown = set(entry) - {"path", "label"}
        if unknown:
            raise ConfigError(f"prompts.files[{i}]: unknown field(s) {', '.join(sorted(unknown))} (known: path, label)")
        out.append({"path": str(entry["path"]), "label": entry.get("label")})
    return out


def prompts_from_dataset(manifest: pd.DataFrame, max_prompts: int | None, seed: int = 0) -> pd.DataFrame:
    """The dataset's distinct captions (at most ``max_prompts``, a seeded random sample, in
    manifest order), each with its first image as ``target_id`` / ``target_file`` and the
    manifest's other columns."""
    first = manifest.drop_duplicates("caption")
    if max_prompts is not None and len(first) > max_prompts:
        first = first.sample(int(max_prompts), random_state=seed).sort_index()
    df = first.rename(columns={"image_id": "target_id", "file": "target_file"})
    cols = ["caption", "target_id", "target_file"]
    df = df[cols + [c for c in df.columns if c not in cols]]
    df.insert(0, "prompt_id", range(len(df)))
    return df.reset_index(drop=True)


def resolve_targets(prompts: pd.DataFrame, manifest: pd.DataFrame | None) -> pd.DataFrame:
    """``target_file`` from a prompt list's ``target_id`` (the manifest's ``image_id``) when absent."""
    if "target_file" in prompts or "target_id" not in prompts or manifest is None:
        return prompts
    files = manifest.drop_duplicates("image_id").set_index("image_id")["file"]
    ids = prompts["target_id"].where(prompts["target_id"].isna(), prompts["target_id"].astype(str))
    unknown = ids.notna() & ~ids.isin(files.index)
    if unknown.any():
        raise DataError(
            f"target_id '{ids[unknown].iloc[0]}' (prompt {prompts['caption'][unknown].iloc[0]!r}) "
            "is not an image_id of the dataset (data=...)"
        )
    return prompts.assign(target_file=ids.map(files))
