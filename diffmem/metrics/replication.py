"""Similarity-based replication scores (Somepalli DCR, Wen/NeMo threshold rates, SSCD normalisation).

Also holds what every metric module shares: :func:`as_array` (input checks) and
:class:`Metric` (the function-plus-settings class each metric exposes).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from diffmem.checks import check_choice, check_positive
from diffmem.errors import ConfigError, DataError


def as_array(
    x: npt.ArrayLike, name: str, ndim: int | tuple[int, ...] | None = None, dtype: npt.DTypeLike | None = np.float64
) -> np.ndarray:
    """``x`` (array-like or torch tensor) as a non-empty, finite numpy array of ``ndim`` dimensions.

    Raises ``DataError`` naming ``name`` otherwise. ``dtype=None`` keeps the input's dtype.
    """
    if hasattr(x, "detach"):  # torch tensor, possibly on GPU or requiring grad
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise DataError(f"{name}: not a numeric array ({err})") from None
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and arr.ndim not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise DataError(f"{name}: expected a {want} array, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{name}: empty input (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.number) and not np.isfinite(arr).all():
        raise DataError(f"{name}: {int((~np.isfinite(arr)).sum())} non-finite values (NaN or inf)")
    return arr


class Metric:
    """A metric function with its settings (thresholds, options) bound at construction.

    ``Metric(**settings)(*inputs)`` == ``fn(*inputs, **settings)``. ``higher_is_better`` reads
    from the mitigation side: less replication is better, so similarity scores and rates
    are ``False``, distances ``True``, and labels or summaries ``None``.
    """

    name: str
    higher_is_better: bool | None = None
    fn: Callable

    def __init__(self, **settings: Any) -> None:
        try:
            inspect.signature(self.fn).bind_partial(**settings)
        except TypeError as err:
            raise ConfigError(f"metric '{self.name}': {err}") from None
        self.settings = settings

    def compute(self, *inputs: Any, **overrides: Any) -> Any:
        return self.fn(*inputs, **{**self.settings, **overrides})

    def __call__(self, *inputs: Any, **overrides: Any) -> Any:
        return self.compute(*inputs, **overrides)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({args})"


def top1_similarity(scores: npt.ArrayLike) -> np.ndarray:
    """Per generation, the highest similarity to the training set: ``[Q]`` from ``[Q, N]``.

    ``scores`` is either the full query-by-training cosine matrix ``[Q, N]`` or a retrieval
    result ``[Q, k]`` (top-k scores, sorted or not): the row maximum is the same for both.
    """
    return as_array(scores, "scores", ndim=2).max(axis=1)


def replication_rate(scores: npt.ArrayLike, threshold: float = 0.7) -> float:
    """Share of generations whose score is strictly above ``threshold`` (Wen / NeMo: SSCD > 0.7).

    ``scores`` has any shape (e.g. ``[G]`` or prompts x generations); every entry is one generation.
    """
    return float((as_array(scores, "scores") > threshold).mean())


def _dcr_stats(top1: np.ndarray, threshold: float, q: float) -> dict[str, float]:
    return {
        "mean": float(top1.mean()),
        f"p{q:g}": float(np.percentile(top1, q)),
        "share_above": replication_rate(top1, threshold),
        "n": int(top1.size),
    }


def dcr_summary(
    top1: npt.ArrayLike, threshold: float = 0.5, baseline_top1: npt.ArrayLike | None = None, q: float = 95
) -> dict[str, float]:
    """Somepalli et al.'s summary of top-1 similarities: mean, ``q``-th percentile, share > threshold.

    With ``baseline_top1`` (held-out real images' top-1 scores against the same training set)
    adds ``baseline_*`` keys with the same statistics and ``diff_*`` = generated - baseline.
    The percentile is numpy's default (linear interpolation).
    """
    out = {"threshold": threshold, **_dcr_stats(as_array(top1, "top1", ndim=1), threshold, q)}
    if baseline_top1 is not None:
        base = _dcr_stats(as_array(baseline_top1, "baseline_top1", ndim=1), threshold, q)
        out.update({f"baseline_{k}": v for k, v in base.items()})
        out.update({f"diff_{k}": out[k] - v for k, v in base.items() if k != "n"})
    return out


def _scores_by_prompt(per_prompt_scores: pd.DataFrame, prompt_col: str, score_col: str) -> dict[Any, np.ndarray]:
    if isinstance(per_prompt_scores, pd.DataFrame):
        missing = [c for c in (prompt_col, score_col) if c not in per_prompt_scores]
        if missing:
            raise DataError(f"per_prompt_scores: no column(s) {', '.join(map(repr, missing))}")
        per_prompt_scores = {p: g[score_col].to_numpy() for p, g in per_prompt_scores.groupby(prompt_col)}
    if not isinstance(per_prompt_scores, Mapping) or not per_prompt_scores:
        raise DataError("per_prompt_scores: expected a non-empty dict or DataFrame of prompt scores")
    return {p: as_array(s, f"per_prompt_scores[{p!r}]") for p, s in per_prompt_scores.items()}


def memorisation_rate(
    per_prompt_scores: pd.DataFrame,
    threshold: float = 0.7,
    memorised_mask: Mapping | None = None,
    reduction: str = "any",
    prompt_col: str = "prompt_id",
    score_col: str = "score",
) -> float:
    """Memorisation rate (Finding Dori): share of memorised prompts whose generations exceed ``threshold``.

    ``per_prompt_scores``: dict ``prompt_id -> generation scores`` or a long DataFrame with
    ``prompt_col`` and ``score_col``. ``memorised_mask``: ``prompt_id -> bool`` (dict or Series)
    restricting the rate to memorised prompts; ``None`` counts every prompt.
    ``reduction="any"``: a prompt counts (1 or 0) when its max generation score > threshold;
    ``"mean"``: a prompt counts as its share of generations > threshold. MR is the mean over prompts.
    """
    check_choice(reduction, "reduction", ("any", "mean"))
    scores = _scores_by_prompt(per_prompt_scores, prompt_col, score_col)
    if memorised_mask is not None:
        mask = dict(memorised_mask)
        unknown = [p for p in scores if p not in mask]
        if unknown:
            raise DataError(f"memorised_mask: no entry for prompt(s) {unknown[:5]}")
        no_scores = [p for p, m in mask.items() if m and p not in scores]
        if no_scores:
            raise DataError(f"memorised_mask: memorised prompt(s) without scores {no_scores[:5]}")
        scores = {p: s for p, s in scores.items() if mask[p]}
        if not scores:
            raise DataError("memorised_mask: selects no prompt")
    if reduction == "any":
        per_prompt = [float(s.max() > threshold) for s in scores.values()]
    else:
        per_prompt = [replication_rate(s, threshold) for s in scores.values()]
    return float(np.mean(per_prompt))


def vm_tm_split(max_scores: npt.ArrayLike, threshold: float = 0.7) -> np.ndarray:
    """NeMo's prompt labels: ``"VM"`` (verbatim) when the max SSCD score > ``threshold``, else ``"TM"``."""
    return np.where(as_array(max_scores, "max_scores", ndim=1) > threshold, "VM", "TM")


def sscd_score_normalisation(
    scores: npt.ArrayLike, background_scores: npt.ArrayLike, beta: float = 1.0, k: int = 10
) -> np.ndarray:
    """SSCD score normalisation: ``scores - beta * mean(k highest background similarities)`` per query.

    ``scores``: ``[Q]`` or ``[Q, K]`` query-to-database similarities. ``background_scores``:
    ``[Q, M]`` (``M >= k``) similarities of each query to a background set of unrelated images
    (e.g. its top-k retrieval); the ``k`` largest of each row are used, whatever their order.
    """
    scores = as_array(scores, "scores", ndim=(1, 2))
    background = as_array(background_scores, "background_scores", ndim=2)
    check_positive(k, "k")
    if background.shape[0] != scores.shape[0]:
        raise DataError(f"background_scores: {background.shape[0]} queries, scores has {scores.shape[0]}")
    if background.shape[1] < k:
        raise DataError(f"background_scores: {background.shape[1]} neighbours per query, need k={k}")
    knn_mean = -np.partition(-background, k - 1, axis=1)[:, :k].mean(axis=1)
    return scores - beta * (knn_mean[:, None] if scores.ndim == 2 else knn_mean)


class Top1Similarity(Metric):
    name, higher_is_better, fn = "top1_similarity", False, staticmethod(top1_similarity)


class DCRSummary(Metric):
    name, higher_is_better, fn = "dcr", None, staticmethod(dcr_summary)


class ReplicationRate(Metric):
    name, higher_is_better, fn = "replication_rate", False, staticmethod(replication_rate)


class MemorisationRate(Metric):
    name, higher_is_better, fn = "memorisation_rate", False, staticmethod(memorisation_rate)


class VMTMSplit(Metric):
    name, higher_is_better, fn = "vm_tm", None, staticmethod(vm_tm_split)


class SSCDScoreNormalisation(Metric):
    name, higher_is_better, fn = "sscd_normalisation", False, staticmethod(sscd_score_normalisation)
