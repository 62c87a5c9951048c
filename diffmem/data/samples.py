"""A generate run's on-disk format: which images it holds and where.

``samples/p<prompt>-s<k>.png`` (one image per planned sample), ``prompts.parquet`` (the
prompt list it sampled) and, once every sample exists, ``samples.parquet`` (one row per
image: ``sample_id, prompt_id, k, seed, file``, the sampler settings and the prompt's
metadata). The generate stage writes it; embed (``source=samples``) and audit read it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from diffmem.errors import DataError
from diffmem.runs import read_parquet
from diffmem.sampling import sample_seed

SAMPLES = "samples.parquet"
PROMPTS = "prompts.parquet"


def plan_samples(prompts: pd.DataFrame, n_per_prompt: int, seed: int) -> pd.DataFrame:
    """One row per planned image: ids, seed and output file (a pure function of the inputs)."""
    rows = []
    for p in prompts.itertuples(index=False):
        for k in range(n_per_prompt):
            rows.append({"sample_id": f"p{p.prompt_id:05d}-s{k:03d}", "prompt_id": p.prompt_id,
                         "k": k, "seed": sample_seed(seed, p.prompt_id, k),
                         "file": f"samples/p{p.prompt_id:05d}-s{k:03d}.png"})
    plan = pd.DataFrame(rows)
    clash = {c: f"prompt_{c}" for c in plan.columns.drop("prompt_id") if c in prompts}  # e.g. a list's `file`
    return plan.merge(prompts.rename(columns=clash), on="prompt_id", how="left")


def read_samples(run_dir: str | Path) -> pd.DataFrame:
    """The samples table of a finished generate run, checked to list at least one image."""
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
    return samples
