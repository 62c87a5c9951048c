"""Aggregating per-prompt scores: median +- MAD (NeMo) and mean / max (Wen), overall or per group."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pandas as pd

from diffmem.errors import DataError
from diffmem.metrics.replication import Metric, as_array


def median_mad(x: npt.ArrayLike) -> dict[str, float]:
    """Median and median absolute deviation ``median(|x - median(x)|)`` of ``x`` (any shape).

    The MAD is unscaled (no 1.4826 normal-consistency factor), as NeMo reports it.
    """
    x = as_array(x, "x")
    med = np.median(x)
    return {"median": float(med), "mad": float(np.median(np.abs(x - med)))}


def mean_max(x: npt.ArrayLike) -> dict[str, float]:
    """Mean and maximum of ``x`` (any shape), as Wen et al. report scores."""
    x = as_array(x, "x")
    return {"mean": float(x.mean()), "max": float(x.max())}


def grouped(df: pd.DataFrame, value: str, by: str, fn: Callable = median_mad) -> pd.DataFrame:
    """``fn`` (e.g. :func:`median_mad`, :func:`mean_max`) of column ``value`` per group of column ``by``.

    One row per group (sorted, index named ``by``), columns = ``fn``'s keys plus ``n``.
    E.g. NeMo's table: ``grouped(df, "sscd", by="type")`` with ``type`` in {VM, TM}.
    """
    missing = [c for c in (value, by) if c not in df]
    if missing:
        raise DataError(f"df: no column(s) {', '.join(map(repr, missing))}")
    if df.empty:
        raise DataError("df: empty input")
    rows = {}
    for group, sub in df.groupby(by, sort=True):
        try:
            rows[group] = {**fn(sub[value].to_numpy()), "n": len(sub)}
        except DataError as err:
            raise DataError(f"df[{value!r}] in group {by}={group!r}: {err}") from None
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(by)


class MedianMAD(Metric):
    name, higher_is_better, fn = "median_mad", None, staticmethod(median_mad)


class MeanMax(Metric):
    name, higher_is_better, fn = "mean_max", None, staticmethod(mean_max)
