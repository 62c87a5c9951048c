"""Load a finished run's outputs (tables, metrics, config) for notebooks and reports."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from diffmem.errors import DataError


@dataclass
class RunResult:
    """A stage's run directory: ``tables`` (Parquet files by stem), ``metrics``, ``config``."""

    path: Path
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    _tables: dict = field(default_factory=dict, repr=False)

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
        return (self.path / "_SUCCESS").exists()


def load_run(path) -> RunResult:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a run directory")
    res = RunResult(path=path)
    if (path / "run.json").exists():
        res.config = json.loads((path / "run.json").read_text())
    if (path / "metrics.json").exists():
        res.metrics = json.loads((path / "metrics.json").read_text())
    return res
