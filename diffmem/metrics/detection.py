"""Detection metrics (docs/methods.md section 2.4): ROC-AUC, TPR at a fixed FPR, bootstrap
intervals, threshold calibration.

Scores follow one convention everywhere: **higher = more likely memorised**. Labels are 1
(memorised, positive) and 0 (not memorised, negative). Each metric is a plain function and
a :class:`~diffmem.metrics.replication.Metric` class::

    detection_metrics(scores, labels)               # {"roc_auc", "tpr_at_fpr", "fpr", ...}
    DetectionMetrics(fpr=0.01)(scores, labels)       # the same, settings bound
    bootstrap_ci(scores, labels)                     # {"roc_auc": [lo, hi], "tpr_at_fpr": [lo, hi]}
    calibrate_threshold(scores[labels == 0])         # NeMo: mean + 1 std of non-memorised

:func:`diffmem.data.labels.ground_truth_labels` turns a prompt table's ground truth into
those labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from diffmem.errors import ConfigError, DataError
from diffmem.metrics.replication import Metric, as_array


def _scores_labels(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
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


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve (sklearn's ``roc_auc_score``; ties count one half)."""
    from sklearn.metrics import roc_auc_score

    s, y = _scores_labels(scores, labels)
    return float(roc_auc_score(y, s))


def roc_points(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of every distinct threshold (sklearn ``roc_curve``, none dropped)."""
    from sklearn.metrics import roc_curve

    s, y = _scores_labels(scores, labels)
    return roc_curve(y, s, drop_intermediate=False)


def tpr_at_fpr(scores: npt.ArrayLike, labels: npt.ArrayLike, fpr: float = 0.01) -> float:
    """The highest TPR of any threshold whose FPR is ``<= fpr`` (Wen et al.'s TPR@1%FPR)."""
    fpr = _check_fpr(fpr)
    fprs, tprs, _ = roc_points(scores, labels)
    return float(tprs[fprs <= fpr + 1e-12].max())  # fpr = 0 (threshold +inf) is always there


def detection_metrics(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    fpr: float = 0.01,
    thresholds: Sequence[float] = (),
    ci_level: float | None = None,
) -> dict:
    """``roc_auc``, ``tpr_at_fpr`` (at ``fpr``), ``fpr``, ``n_pos`` and ``n_neg``.

    With ``ci_level`` (e.g. 0.95) also ``roc_auc_ci`` and ``tpr_at_fpr_ci``, ``[lo, hi]``
    stratified percentile bootstrap intervals (:func:`bootstrap_ci`, seed 0), and ``ci_level``.

    With ``thresholds`` (e.g. cosine similarities of a copy detector) also the classes'
    median scores and ``precision@t`` / ``recall@t`` of flagging ``score > t`` (precision
    None when nothing is flagged).
    """
    s, y = _scores_labels(scores, labels)
    out: dict = {
        "roc_auc": roc_auc(s, y),
        "tpr_at_fpr": tpr_at_fpr(s, y, fpr),
        "fpr": float(fpr),
        "n_pos": int(y.sum()),
        "n_neg": int((y == 0).sum()),
    }
    if ci_level is not None:
        ci = bootstrap_ci(s, y, fpr, level=ci_level)
        out.update(roc_auc_ci=ci["roc_auc"], tpr_at_fpr_ci=ci["tpr_at_fpr"], ci_level=float(ci_level))
    if len(thresholds):
        out.update(positive_median=float(np.median(s[y == 1])), negative_median=float(np.median(s[y == 0])))
    for t in thresholds:
        flagged = s > t
        out[f"precision@{t}"] = float(y[flagged].mean()) if flagged.any() else None
        out[f"recall@{t}"] = float(flagged[y == 1].mean())
    return out


def bootstrap_replicates(
    scores: npt.ArrayLike, labels: npt.ArrayLike, fpr: float = 0.01, n_boot: int = 2000, seed: int = 0
) -> dict[str, np.ndarray]:
    """``roc_auc`` and ``tpr_at_fpr`` of ``n_boot`` stratified bootstrap resamples: ``{metric: [n_boot]}``.

    Positives and negatives are resampled with replacement separately (each replicate keeps
    both classes at their sizes), so the spread measures how the metrics move with the
    *prompts* drawn; it says nothing about prompts unlike the ones scored. AUC per replicate
    is the Mann-Whitney statistic from resample counts (ties one half, as :func:`roc_auc`);
    TPR@FPR is the share of positives above the negative that ``fpr`` lets pass.
    """
    s, y = _scores_labels(scores, labels)
    fpr = _check_fpr(fpr)
    pos, neg = s[y == 1], s[y == 0]
    rng = np.random.default_rng(seed)
    ip = rng.integers(0, pos.size, (int(n_boot), pos.size))
    ineg = rng.integers(0, neg.size, (int(n_boot), neg.size))
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [n_pos, n_neg]
    wp = np.stack([np.bincount(r, minlength=pos.size) for r in ip]).astype(float)
    wn = np.stack([np.bincount(r, minlength=neg.size) for r in ineg]).astype(float)
    auc = np.einsum("bi,ij,bj->b", wp, wins, wn) / (pos.size * neg.size)
    allowed = int(np.floor(fpr * neg.size + 1e-12))  # false positives a threshold may let through
    if allowed >= neg.size:
        tpr = np.ones(int(n_boot))
    else:
        cut = -np.sort(-neg[ineg], axis=1)[:, allowed]  # the highest negative that must stay below
        tpr = (pos[ip] > cut[:, None]).mean(axis=1)
    return {"roc_auc": auc, "tpr_at_fpr": tpr}


def bootstrap_ci(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    fpr: float = 0.01,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals ``{"roc_auc": [lo, hi], "tpr_at_fpr": [lo, hi]}``.

    See :func:`bootstrap_replicates`. With perfectly separated classes every replicate is
    perfect too and the interval collapses to ``[1, 1]``: with 8 positives, read that as
    "no error among these 8", not as certainty.
    """
    if not 0 < level < 1:
        raise ConfigError(f"level: must be in (0, 1), got {level}")
    tail = 100 * (1 - level) / 2
    return {
        k: [float(v) for v in np.percentile(r, [tail, 100 - tail])]
        for k, r in bootstrap_replicates(scores, labels, fpr, n_boot, seed).items()
    }


def with_ci(metrics: Mapping, key: str) -> str:
    """``"0.961 [95% CI 0.891-1.000]"``: ``metrics[key]`` and its ``{key}_ci`` as one console phrase."""
    lo, hi = metrics[f"{key}_ci"]
    return f"{metrics[key]:.3f} [{metrics['ci_level']:.0%} CI {lo:.3f}-{hi:.3f}]"


def calibrate_threshold(negative_scores: npt.ArrayLike, k: float = 1.0) -> float:
    """NeMo's threshold: ``mean + k * std`` of non-memorised prompts' scores (std with ddof=1).

    NeMo reports 0.428 for the noise-SSIM score on SD v1.4.
    """
    x = as_array(negative_scores, "negative_scores", ndim=1)
    if x.size < 2:
        raise DataError(f"negative_scores: need at least 2 scores to estimate a spread, got {x.size}")
    return float(x.mean() + k * x.std(ddof=1))


def rates_at_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float) -> dict[str, float]:
    """TPR and FPR when every score strictly above ``threshold`` is flagged as memorised."""
    s, y = _scores_labels(scores, labels)
    flagged = s > threshold
    return {"threshold": float(threshold), "tpr": float(flagged[y == 1].mean()), "fpr": float(flagged[y == 0].mean())}


class DetectionMetrics(Metric):
    name, higher_is_better, fn = "detection", None, staticmethod(detection_metrics)


class ROCAUC(Metric):
    name, higher_is_better, fn = "roc_auc", None, staticmethod(roc_auc)


class TPRAtFPR(Metric):
    name, higher_is_better, fn = "tpr_at_fpr", None, staticmethod(tpr_at_fpr)


class CalibrateThreshold(Metric):
    name, higher_is_better, fn = "calibrate_threshold", None, staticmethod(calibrate_threshold)


def evaluate(table: pd.DataFrame, fpr: float = 0.01, ci_level: float | None = 0.95) -> dict:
    """Ground-truth metrics of a ``scores`` table (empty without a usable ``label`` column), with
    bootstrap intervals at ``ci_level`` (None: none)."""
    if "label" not in table:
        return {}
    known = table[table["label"].notna()]
    y, s = known["label"].to_numpy(int), known["score"].to_numpy(float)
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    out: dict = {"n_pos": n_pos, "n_neg": n_neg, "n_excluded": int(len(table) - len(known))}
    if n_pos and "hard_negative" in table:  # memorised vs trained-on-but-not-memorised
        hard = table[(table["label"] == 1) | table["hard_negative"].fillna(False).astype(bool)]
        out["hard_negatives"] = detection_metrics(
            hard["score"].to_numpy(float), hard["label"].eq(1).to_numpy(int), fpr=fpr, ci_level=ci_level
        )
    if n_pos == 0 or n_neg == 0:
        out["note"] = (
            f"no ROC metrics: {n_pos} positives and {n_neg} negatives among the prompts "
            "(ROC needs both; see positives=... and the prompts' ground truth)"
        )
        return out
    out.update(detection_metrics(s, y, fpr=fpr, ci_level=ci_level))
    if n_neg >= 2:
        thr = calibrate_threshold(s[y == 0])
        out["calibrated_threshold"] = {"rule": "mean + 1 std of negatives", **rates_at_threshold(s, y, thr)}
    return out


def summary_lines(results: dict) -> list[str]:
    """What the console says about the ground truth: the AUCs, or why there are none."""
    if not results:
        return [
            "no ROC metrics: the prompts carry no ground truth (a type/overfit_type/memorisation_type "
            "column, a file label, or testbed kind/dup_count)"
        ]
    lines = [
        f"{results['n_pos']} memorised vs {results['n_neg']} not memorised prompts ({results['n_excluded']} left out)"
    ]
    if "roc_auc" in results:
        lines.append(
            f"ROC-AUC {with_ci(results, 'roc_auc')}, TPR@{results['fpr']:g}FPR {with_ci(results, 'tpr_at_fpr')}"
        )
    else:
        lines.append(results["note"])
    if "hard_negatives" in results:
        h = results["hard_negatives"]
        lines.append(
            f"memorised vs hard negatives ({h['n_neg']} prompts trained on but not memorised): "
            f"ROC-AUC {with_ci(h, 'roc_auc')}, TPR@{h['fpr']:g}FPR {with_ci(h, 'tpr_at_fpr')}"
        )
    return lines


def group_summary(table: pd.DataFrame) -> list[dict]:
    """Mean / std / n of the score per ground-truth group (testbed kind x dup_count, or type)."""
    keys = (
        [c for c in ("kind", "dup_count") if c in table]
        or [c for c in ("type",) if c in table]
        or [c for c in ("memorisation_type",) if c in table]
    )
    if not keys:
        return []
    g = table.groupby(keys, dropna=False)["score"].agg(["mean", "std", "count"]).reset_index()
    g = g.astype(object).where(g.notna(), None)  # std of a single prompt: null, not NaN
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in g.to_dict(orient="records")]
