"""Load a finished run's outputs (tables, metrics, fingerprint) for notebooks and reports."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from diffmem.errors import DataError
from diffmem.runs import METRICS, RUN_FILE, is_done, read_json


@dataclass
class RunResult:
    """A stage's run directory: ``tables`` (Parquet files by stem), ``metrics``, and
    ``fingerprint``: the result-affecting settings the run was claimed with (``run.json``; the
    full resolved config is in the provenance of ``metrics.json`` / ``info.json``)."""

    path: Path
    fingerprint: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    _tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def tables(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.path.glob("*.parquet"))}

    def table(self, name: str) -> pd.DataFrame:
        if name not in self._tables:
            if name not in self.tables:
                raise DataError(f"{self.path}: no table '{name}' (has: {', '.join(self.tables)})")
            self._tables[name] = pd.read_parquet(self.tables[name])
        return self._tables[name]

    @property
    def done(self) -> bool:
        return is_done(self.path)


def load_run(path: str | os.PathLike[str]) -> RunResult:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a run directory")
    res = RunResult(path=path)
    if (path / RUN_FILE).exists():
        res.fingerprint = read_json(path / RUN_FILE)
    if (path / METRICS).exists():
        res.metrics = read_json(path / METRICS)
    return res
