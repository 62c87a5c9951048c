"""An embed run's on-disk format, read and written in one place.

``features/part-XXXXX.npy`` (float32 [n, D], L2-normalised, one file per ``part_size``
items, written atomically so a killed run resumes at the first missing part; a part holds
fewer rows when some of its images could not be read under ``data.on_error=skip``, and
``features/skipped-XXXXX.parquet`` lists those), ``ids.parquet`` (slim: ``item_id`` and
``file`` of each vector, in order — what an index and its searches load),
``items.parquet`` (the embedded items' other columns: captions and labels, kept once),
``skipped.parquet`` (``item_id``, ``file``, ``error`` of every skipped image) and the run's
``info.json`` (``feature``, ``dim``, extractor info, provenance). The embed stage writes
through :class:`FeatureStore`; the index and search stages read through it, so every
reader gets the same checks (finished run, readable float parts of the recorded D, as many
ids as vectors) and the same one-line errors. A resumed embed run checks its parts from
their headers and sizes and recomputes a damaged one.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from diffmem.errors import DataError
from diffmem.runs import (
    INFO,
    RUN_FILE,
    atomic_path,
    digest,
    file_stamp,
    is_done,
    parquet_rows,
    read_json,
    read_parquet,
    reopen,
    write_parquet,
)

PARTS = "features"
IDS = "ids.parquet"
ITEMS = "items.parquet"
SKIPPED = "skipped.parquet"
log = logging.getLogger(__name__)


class FeatureStore:
    """The feature parts, ids table and info of the embed run in ``run_dir``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.ids_path = self.run_dir / IDS
        self.skipped_path = self.run_dir / SKIPPED

    # ------------------------------------------------------------------ writing (embed)

    def part_path(self, p: int) -> Path:
        return self.run_dir / PARTS / f"part-{p:05d}.npy"

    def has_part(self, p: int, n_items: int | None = None, dim: int | None = None) -> bool:
        """Whether part ``p`` exists; given the number of items planned for it (and ``dim``),
        whether it is also complete: a damaged part is removed, with one warning line naming
        it, so that the embed stage recomputes it instead of trusting it."""
        if not self.part_path(p).exists():
            return False
        return n_items is None or self._keep_if_intact(p, n_items, dim)

    def intact(self, part_size: int) -> bool:
        """Whether every part of this finished run is complete, checked cheaply (each part's
        ``.npy`` header and file size against the ids and skipped counts: no vector read). If
        not, the damaged parts are removed (one warning line each) and the run reopened, so
        that a re-run of the embed stage recomputes them."""
        try:
            skipped = parquet_rows(self.skipped_path) if self.skipped_path.is_file() else 0
            n, dim = parquet_rows(self.ids_path) + skipped, self.info().get("dim")
        except DataError as err:
            log.warning("%s; recomputing the run's tables", err)
            reopen(self.run_dir)
            return False
        kept = []
        for p in range(-(-n // part_size)):
            if not self.part_path(p).exists():
                log.warning("%s: missing; recomputing it", self.part_path(p))
            kept.append(self.has_part(p, min(part_size, n - p * part_size), dim))
        if not all(kept):
            reopen(self.run_dir)
        return all(kept)

    def _keep_if_intact(self, p: int, n_items: int, dim: int | None) -> bool:
        path, skipped = self.part_path(p), self._skipped_path(p)
        try:
            why = _part_damage(path, n_items - (parquet_rows(skipped) if skipped.is_file() else 0), dim)
        except DataError as err:  # its list of skipped images is damaged: recompute both
            why = str(err)
        if why is None:
            return True
        log.warning("%s: %s; recomputing it", path, why)
        path.unlink()
        skipped.unlink(missing_ok=True)
        return False

    def write_part(self, p: int, vectors: np.ndarray, skipped: pd.DataFrame | None = None) -> None:
        """Part ``p`` as float32, atomically (a killed write leaves no part behind), after the
        list of its ``skipped`` items (``item_id``, ``file``, ``error``) when there are any."""
        if skipped is not None and len(skipped):
            write_parquet(self._skipped_path(p), skipped)
        with atomic_path(self.part_path(p)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(vectors, dtype=np.float32))

    def _skipped_path(self, p: int) -> Path:
        return self.run_dir / PARTS / f"skipped-{p:05d}.parquet"

    def write_ids(self, items: pd.DataFrame) -> int:
        """The ids (``item_id``, ``file``), the items' other columns and the skipped list, once
        every part exists: ``items`` minus the skipped ones. Returns how many were skipped."""
        lists = [read_parquet(path) for path in sorted((self.run_dir / PARTS).glob("skipped-*.parquet"))]
        skipped = (
            pd.concat(lists, ignore_index=True)
            if lists
            else pd.DataFrame({"item_id": [], "file": [], "error": []}, dtype=str)
        )
        write_parquet(self.skipped_path, skipped)
        kept = items[~items["item_id"].isin(skipped["item_id"])].reset_index(drop=True)
        write_parquet(self.run_dir / ITEMS, kept)
        write_parquet(self.ids_path, kept[["item_id", "file"]])
        return len(skipped)

    # ------------------------------------------------------------------ reading

    def part_paths(self) -> list[Path]:
        """The part files, in order, checked to be numbered without a gap (a missing part
        would shift every later row's id)."""
        parts = sorted((self.run_dir / PARTS).glob("part-*.npy"))
        if not parts:
            raise DataError(f"{self.run_dir}: no feature parts ({PARTS}/part-*.npy)")
        for p, path in enumerate(parts):
            if path != self.part_path(p):
                raise DataError(
                    f"{self.part_path(p)}: missing (only {len(parts)} parts, numbered up to "
                    f"{parts[-1].name}); re-run the embed stage"
                )
        return parts

    def content_digest(self) -> str:
        """What this finished embed run holds, as a short digest: its config (``run.json``),
        its ids table and its parts' sizes and ends (the first and last 64 KiB: a cheap look
        at vectors that may not fit in RAM). An index or search records it, so a folder
        re-embedded under the same path is never paired with results of the old one."""
        self._finished_info()
        run_json = self.run_dir / RUN_FILE
        with open(self.ids_path, "rb") as fh:
            ids = hashlib.file_digest(fh, "sha256").hexdigest()
        return digest(
            {
                "config": read_json(run_json) if run_json.is_file() else None,
                "ids": ids,
                "parts": [file_stamp(p, 1 << 16) for p in self.part_paths()],
            }
        )

    def info(self) -> dict:
        """The run's ``info.json``, checked to be an embed run's (it names its ``feature``)."""
        path = self.run_dir / INFO
        if not path.is_file():
            raise DataError(f"{self.run_dir}: not an embed run ({INFO} missing)")
        info = read_json(path)
        if not isinstance(info, dict) or "feature" not in info:
            raise DataError(f"{path}: no 'feature' field (is {self.run_dir} an embed run?)")
        return info

    def warning(self) -> str | None:
        """What the extractor's info says against its vectors (a randomly initialised CLIP), if anything."""
        return ((self.info().get("extractor") or {}).get("weights") or {}).get("warning")

    def ids(self) -> pd.DataFrame:
        """The ids table (``item_id``, ``file``), one row per vector."""
        return read_parquet(self.ids_path)

    def items(self) -> pd.DataFrame:
        """The ids table with the items' other columns (captions, labels), one row per vector;
        a run written before ``items.parquet`` existed kept them in its ids table."""
        path = self.run_dir / ITEMS
        return read_parquet(path) if path.is_file() else self.ids()

    def skipped(self) -> pd.DataFrame:
        """The images left out under ``data.on_error=skip`` (``item_id``, ``file``, ``error``)."""
        if self.skipped_path.is_file():
            return read_parquet(self.skipped_path)
        return pd.DataFrame({"item_id": [], "file": [], "error": []})

    def load(self) -> tuple[np.ndarray, pd.DataFrame, dict]:
        """``(vectors [N, D], ids table, info)`` of a finished embed run, every row checked finite."""
        info = self._finished_info()
        x = np.concatenate(self._parts(info, mmap=False)).astype(np.float32, copy=False)
        ids = self.ids()
        self._check_count(len(ids), len(x))
        return x, ids, info

    def part_maps(self) -> tuple[list[np.ndarray], dict]:
        """``(parts memory-mapped, info)`` of a finished embed run, for sets larger than RAM.

        Checked as :meth:`load` checks them except for the scan of every row for NaN, which
        the index does on the rows it reads (a training sample reads only its rows)."""
        info = self._finished_info()
        maps = self._parts(info, mmap=True)
        self._check_count(parquet_rows(self.ids_path), sum(len(m) for m in maps))
        return maps, info

    def _finished_info(self) -> dict:
        if not is_done(self.run_dir):
            raise DataError(f"{self.run_dir}: not a finished embed run (no _SUCCESS)")
        info = self.info()
        if not self.ids_path.is_file():
            raise DataError(f"{self.run_dir}: not an embed run ({IDS} missing)")
        return info

    def _parts(self, info: dict, mmap: bool) -> list[np.ndarray]:
        """Every part, checked: a float [n, D] array of the recorded D (or the first part's)."""
        dim = int(info["dim"]) if info.get("dim") is not None else None
        parts = []
        for path in self.part_paths():
            x = _read_part(path, dim, scan_rows=not mmap)
            dim = x.shape[1]
            parts.append(x)
        return parts

    def _check_count(self, n_ids: int, n_vectors: int) -> None:
        if n_ids != n_vectors:
            raise DataError(f"{self.run_dir}: {n_ids} ids but {n_vectors} vectors")


def _part_damage(path: Path, rows: int, dim: int | None) -> str | None:
    """What is wrong with the part at ``path`` that should hold ``rows`` float32 vectors of
    ``dim`` (any D when None), from its header and file size alone; None when nothing is."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(fh)
            start = fh.tell()
    except (ValueError, OSError, EOFError) as err:
        return f"not a readable .npy array ({type(err).__name__})"
    want = (rows, dim if dim is not None else (shape[-1] if len(shape) == 2 else -1))
    if tuple(shape) != want or dtype != np.float32:
        return f"holds {dtype} {tuple(shape)}, expected float32 {want}"
    size, expected = path.stat().st_size, start + rows * want[1] * 4
    if size != expected:
        return f"{size} bytes, expected {expected} (cut short or padded)"
    return None


def _read_part(path: Path, dim: int | None, scan_rows: bool) -> np.ndarray:
    """One part: a readable float [n, D] array (D = ``dim`` when given); with ``scan_rows``
    loaded and every row checked finite, else memory-mapped (errors name the file and row)."""
    try:
        x = np.load(path, allow_pickle=False, mmap_mode=None if scan_rows else "r")
    except (ValueError, OSError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable .npy array ({first}); re-run the embed stage") from err
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: expected a float array [n, D], got {x.dtype} of shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise DataError(f"{path}: vectors have D={x.shape[1]}, expected D={dim}")
    if scan_rows:
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            more = f" (and {int(bad.sum()) - 1} more rows)" if bad.sum() > 1 else ""
            raise DataError(f"{path}: row {int(bad.argmax())}{more} contains NaN or infinite values")
    return x
