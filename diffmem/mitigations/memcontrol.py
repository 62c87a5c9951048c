"""MemControl's outer loop (Dutt et al. 2024): the Optuna study behind ``experiment=memcontrol``.

The search itself is Hydra's Optuna sweeper (NSGA-II over the mask genes and the learning
rate, SQLite storage) launching ``diffmem mitigate mitigation=memcontrol`` trials, each a
submitit job on a cluster. This module holds what the sweeper does not: the config resolvers
that make a re-launched study resume (``optuna_storage`` creates the database's folder,
``optuna_remaining`` runs only the trials still missing; :func:`diffmem.runs.digest` names each
trial's run dir after its settings, so a repeated setting reuses its finished work) and the Pareto front of the
stored trials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffmem.errors import DataError


def storage_url(path: str) -> str:
    """``sqlite:///<absolute path>``, creating the folder (SQLite does not)."""
    p = Path(path).expanduser().resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p}"


def completed_trials(storage: str, study_name: str) -> int:
    """Trials of the stored study that finished (0 when it does not exist yet)."""
    import optuna

    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).exists():
        return 0
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def remaining_trials(storage: str, study_name: str, total: int | str) -> int:
    """How many trials a launch still runs for the study to reach ``total`` finished ones."""
    return max(int(total) - completed_trials(storage, study_name), 0)


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Rows of ``values`` ``[N, K]`` (all minimised) that no other row dominates."""
    v: Any = np.asarray(values, float)  # numpy's stubs lose the array type through .all(-1)
    dominated = ((v[None, :, :] <= v[:, None, :]).all(-1) & (v[None, :, :] < v[:, None, :]).any(-1)).any(1)
    return ~dominated


def study_table(storage: str, study_name: str) -> pd.DataFrame:
    """One row per finished trial: number, ``memorisation``, ``fd``, its params, ``pareto``."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError as err:
        raise DataError(f"study '{study_name}' is not in {storage}") from err
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise DataError(f"study '{study_name}' in {storage} has no finished trial")
    table = pd.DataFrame(
        [{"trial": t.number, "memorisation": t.values[0], "fd": t.values[1], **t.params} for t in done]
    )
    table["pareto"] = pareto_mask(table[["memorisation", "fd"]].to_numpy())
    return table
