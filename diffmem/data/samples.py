"""A generate run's on-disk format: which images it holds and where.

``samples/p<prompt>-s<k>.png`` (one image per planned sample), ``prompts.parquet`` (the
prompt list it sampled) and, once every sample exists, ``samples.parquet`` (one row per
image: ``sample_id, prompt_id, k, seed, file``, the sampler settings and the prompt's
metadata). The generate stage writes it; embed (``source=samples``) and audit read it.
Every reader checks the PNGs cheaply (signature, size, end marker: a file cut short is
found); a resumed generate run recomputes damaged ones.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from diffmem.errors import DataError
from diffmem.runs import read_parquet, reopen

SAMPLES = "samples.parquet"
PROMPTS = "prompts.parquet"
_PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"
_PNG_TAIL = b"\x00\x00\x00\x00IEND\xaeB`\x82"
log = logging.getLogger(__name__)


def plan_samples(prompts: pd.DataFrame, n_per_prompt: int, seed: int) -> pd.DataFrame:
    """One row per planned image: ids, seed and output file (a pure function of the inputs)."""
    from diffmem.sampling import sample_seed  # here: the readers of a run (embed) need no torch

    rows = []
    for p in prompts.itertuples(index=False):
        for k in range(n_per_prompt):
            rows.append(
                {
                    "sample_id": f"p{p.prompt_id:05d}-s{k:03d}",
                    "prompt_id": p.prompt_id,
                    "k": k,
                    "seed": sample_seed(seed, p.prompt_id, k),
                    "file": f"samples/p{p.prompt_id:05d}-s{k:03d}.png",
                }
            )
    plan = pd.DataFrame(rows)
    clash = {c: f"prompt_{c}" for c in plan.columns.drop("prompt_id") if c in prompts}  # e.g. a list's `file`
    return plan.merge(prompts.rename(columns=clash), on="prompt_id", how="left")


def _png_size(path: Path) -> tuple[int, int] | str:
    """``(width, height)`` of a complete PNG, read from its first and last bytes alone (a file
    cut short has lost its IEND trailer), or what is wrong with it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - len(_PNG_TAIL)))
            tail = fh.read()
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if not head.startswith(_PNG_HEAD):
        return "not a PNG"
    if tail != _PNG_TAIL:
        return "cut short (no PNG end marker)"
    return struct.unpack(">II", head[16:24])


def damaged_samples(run_dir: str | Path, files: Iterable[str]) -> list[tuple[Path, str]]:
    """``(path, what is wrong)`` of each sample PNG among ``files`` that is missing, not a
    complete PNG or not of the size most of them have (cheap: no pixel is decoded)."""
    sizes = {Path(run_dir) / f: _png_size(Path(run_dir) / f) for f in files}
    common = Counter(v for v in sizes.values() if isinstance(v, tuple)).most_common(1)
    return [
        (p, v if isinstance(v, str) else f"{v[0]}x{v[1]}, the others are {common[0][0][0]}x{common[0][0][1]}")
        for p, v in sizes.items()
        if isinstance(v, str) or v != common[0][0]
    ]


def drop_damaged(run_dir: str | Path, files: Iterable[str], finished: bool = False) -> bool:
    """Remove the damaged sample PNGs among ``files`` (:func:`damaged_samples`; a missing one
    counts only in a ``finished`` run, which is then reopened), one warning line each, so that
    the generate stage recomputes them. Returns whether all were intact."""
    run_dir = Path(run_dir)
    present = files if finished else [f for f in files if (run_dir / f).exists()]
    bad = damaged_samples(run_dir, present)
    for path, why in bad:
        log.warning("%s: %s; recomputing it", path, why)
        path.unlink(missing_ok=True)
    if bad and finished:
        reopen(run_dir)
    return not bad


def samples_intact(run_dir: str | Path) -> bool:
    """Whether every sample of a finished generate run is a complete PNG; if not, the damaged
    ones are removed and the run reopened (:func:`drop_damaged`), as when its table is unreadable."""
    try:
        files = read_parquet(Path(run_dir) / SAMPLES)["file"]
    except DataError as err:
        log.warning("%s; recomputing the samples table", err)
        reopen(run_dir)
        return False
    return drop_damaged(run_dir, files, finished=True)


def read_samples(run_dir: str | Path) -> pd.DataFrame:
    """The samples table of a finished generate run, checked to list at least one image and
    that every image is a complete PNG (:func:`damaged_samples`)."""
    run_dir = Path(run_dir)
    table = run_dir / SAMPLES
    if not table.exists():
        raise DataError(f"{table}: not found (is {run_dir} a finished generate run?)")
    samples = read_parquet(table)
    missing = [c for c in ("sample_id", "file") if c not in samples]
    if missing:
        raise DataError(f"{table}: no {' or '.join(missing)} column (is {run_dir} a generate run?)")
    if samples.empty:
        raise DataError(f"{table}: no samples")
    for path, why in damaged_samples(run_dir, samples["file"])[:1]:
        raise DataError(f"{path}: {why}; re-run the generate stage to recompute it")
    return samples
