"""Detection metrics (docs/methods.md section 2.4): ROC-AUC, TPR at a fixed FPR, threshold calibration.

Scores follow one convention everywhere: **higher = more likely memorised**. Labels are 1
(memorised, positive) and 0 (not memorised, negative). Each metric is a plain function and
a :class:`~diffmem.metrics.replication.Metric` class::

    detection_metrics(scores, labels)               # {"roc_auc", "tpr_at_fpr", "fpr", ...}
    DetectionMetrics(fpr=0.01)(scores, labels)       # the same, settings bound
    calibrate_threshold(scores[labels == 0])         # NeMo: mean + 1 std of non-memorised

:func:`ground_truth_labels` turns a prompt table's ground-truth columns (testbed ``kind`` /
``dup_count``, or a prompt list's ``type`` VM/TM column) into those labels.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from diffmem.errors import ConfigError, DataError
from diffmem.metrics.replication import Metric, as_array

#: the fields of a ``positives`` config (``conf/positives/``, e.g. testbed.yaml)
POSITIVES_FIELDS = ("kinds", "min_dup_count", "negative_kinds", "types")


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = as_array(scores, "scores", ndim=1)
    y = as_array(labels, "labels", ndim=1)
    if s.shape != y.shape:
        raise DataError(f"labels: {y.size} values, scores has {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise DataError("labels: must be 0 (not memorised) or 1 (memorised)")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise DataError(f"labels: need both classes, got {n_pos} positives and {y.size - n_pos} negatives")
    return s, y.astype(int)


def _check_fpr(fpr: float) -> float:
    if not 0 <= fpr < 1:
        raise ConfigError(f"fpr: must be in [0, 1), got {fpr}")
    return float(fpr)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (sklearn's ``roc_auc_score``; ties count one half)."""
    from sklearn.metrics import roc_auc_score

    s, y = _scores_labels(scores, labels)
    return float(roc_auc_score(y, s))


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of every distinct threshold (sklearn ``roc_curve``, none dropped)."""
    from sklearn.metrics import roc_curve

    s, y = _scores_labels(scores, labels)
    return roc_curve(y, s, drop_intermediate=False)


def tpr_at_fpr(scores, labels, fpr: float = 0.01) -> float:
    """The highest TPR of any threshold whose FPR is ``<= fpr`` (Wen et al.'s TPR@1%FPR)."""
    fpr = _check_fpr(fpr)
    fprs, tprs, _ = roc_points(scores, labels)
    return float(tprs[fprs <= fpr + 1e-12].max())  # fpr = 0 (threshold +inf) is always there


def detection_metrics(scores, labels, fpr: float = 0.01) -> dict[str, float]:
    """``roc_auc``, ``tpr_at_fpr`` (at ``fpr``), ``fpr``, ``n_pos`` and ``n_neg``."""
    s, y = _scores_labels(scores, labels)
    return {"roc_auc": roc_auc(s, y), "tpr_at_fpr": tpr_at_fpr(s, y, fpr), "fpr": float(fpr),
            "n_pos": int(y.sum()), "n_neg": int((y == 0).sum())}


def calibrate_threshold(negative_scores, k: float = 1.0) -> float:
    """NeMo's threshold: ``mean + k * std`` of non-memorised prompts' scores (std with ddof=1).

    NeMo reports 0.428 for the noise-SSIM score on SD v1.4.
    """
    x = as_array(negative_scores, "negative_scores", ndim=1)
    if x.size < 2:
        raise DataError(f"negative_scores: need at least 2 scores to estimate a spread, got {x.size}")
    return float(x.mean() + k * x.std(ddof=1))


def rates_at_threshold(scores, labels, threshold: float) -> dict[str, float]:
    """TPR and FPR when every score strictly above ``threshold`` is flagged as memorised."""
    s, y = _scores_labels(scores, labels)
    flagged = s > threshold
    return {"threshold": float(threshold), "tpr": float(flagged[y == 1].mean()),
            "fpr": float(flagged[y == 0].mean())}


def check_positives(positives: Mapping | None) -> dict:
    """``positives`` as a dict with exactly the fields of :data:`POSITIVES_FIELDS`."""
    pos = dict(positives) if positives else {}
    unknown = set(pos) - set(POSITIVES_FIELDS)
    if unknown:
        raise ConfigError(f"positives: unknown field(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(POSITIVES_FIELDS)})")
    missing = [f for f in POSITIVES_FIELDS if f not in pos]
    if missing:
        raise ConfigError(f"positives: missing field(s) {', '.join(missing)} (select a ground truth, "
                          f"e.g. positives=testbed)")
    return pos


def ground_truth_labels(prompts: pd.DataFrame, positives: Mapping | None) -> pd.Series | None:
    """Per prompt 1.0 (memorised), 0.0 (not) or NaN (left out); None without ground-truth columns.

    Testbed prompts (``kind`` + ``dup_count``): positives are ``kinds`` with ``dup_count >=
    min_dup_count``, negatives are ``negative_kinds``; everything else (rarer canaries,
    templates unless listed) is left out. Prompt lists with a ``type`` column (NeMo's VM/TM):
    ``type`` in ``types`` is positive, any other value (or none) negative.
    """
    pos = check_positives(positives)
    if "kind" in prompts and "dup_count" in prompts:
        kinds, neg = set(pos["kinds"] or ()), set(pos["negative_kinds"] or ())
        if kinds & neg:
            both = ", ".join(sorted(kinds & neg))
            raise ConfigError(f"positives: kinds and negative_kinds overlap ({both})")
        dup = pd.to_numeric(prompts["dup_count"], errors="coerce").fillna(0)
        is_pos = prompts["kind"].isin(kinds) & (dup >= float(pos["min_dup_count"]))
        is_neg = prompts["kind"].isin(neg)
    elif "type" in prompts:
        types = {str(t) for t in (pos["types"] or ())}
        is_pos = prompts["type"].astype(str).isin(types)
        is_neg = ~is_pos
    else:
        return None
    labels = pd.Series(np.nan, index=prompts.index, name="label")
    labels[is_neg] = 0.0
    labels[is_pos] = 1.0
    return labels


def describe_positives(prompts: pd.DataFrame, positives: Mapping | None) -> str:
    """A one-line description of what counts as memorised, for ``metrics.json``."""
    pos = check_positives(positives)
    if "kind" in prompts and "dup_count" in prompts:
        return (f"kind in {list(pos['kinds'])} with dup_count >= {pos['min_dup_count']} vs "
                f"kind in {list(pos['negative_kinds'])}")
    return f"type in {list(pos['types'])} vs every other prompt"


class DetectionMetrics(Metric):
    name, higher_is_better, fn = "detection", None, staticmethod(detection_metrics)


class ROCAUC(Metric):
    name, higher_is_better, fn = "roc_auc", None, staticmethod(roc_auc)


class TPRAtFPR(Metric):
    name, higher_is_better, fn = "tpr_at_fpr", None, staticmethod(tpr_at_fpr)


class CalibrateThreshold(Metric):
    name, higher_is_better, fn = "calibrate_threshold", None, staticmethod(calibrate_threshold)
