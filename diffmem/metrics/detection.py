"""Detection metrics (docs/methods.md section 2.4): ROC-AUC, TPR at a fixed FPR, threshold calibration.

Scores follow one convention everywhere: **higher = more likely memorised**. Labels are 1
(memorised, positive) and 0 (not memorised, negative). Each metric is a plain function and
a :class:`~diffmem.metrics.replication.Metric` class::

    detection_metrics(scores, labels)               # {"roc_auc", "tpr_at_fpr", "fpr", ...}
    DetectionMetrics(fpr=0.01)(scores, labels)       # the same, settings bound
    calibrate_threshold(scores[labels == 0])         # NeMo: mean + 1 std of non-memorised

:func:`diffmem.data.labels.ground_truth_labels` turns a prompt table's ground truth into
those labels.
"""

from __future__ import annotations

import numpy as np

from diffmem.errors import ConfigError, DataError
from diffmem.metrics.replication import Metric, as_array

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


class DetectionMetrics(Metric):
    name, higher_is_better, fn = "detection", None, staticmethod(detection_metrics)


class ROCAUC(Metric):
    name, higher_is_better, fn = "roc_auc", None, staticmethod(roc_auc)


class TPRAtFPR(Metric):
    name, higher_is_better, fn = "tpr_at_fpr", None, staticmethod(tpr_at_fpr)


class CalibrateThreshold(Metric):
    name, higher_is_better, fn = "calibrate_threshold", None, staticmethod(calibrate_threshold)
