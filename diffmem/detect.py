"""``diffmem detect``: score prompts for memorisation without the training set (docs/methods.md section 2).

``detect=noise_norm|noise_ssim|one_step`` picks the detector (``diffmem.detectors``). Writes
to the run dir:

- ``scores.parquet``: ``prompt_id, caption, detector, score`` (higher = more likely memorised)
  plus the prompts' ground-truth columns when present (testbed ``kind``, ``group``,
  ``dup_count``; prompt lists' ``type``, ``overfit_type``, ``memorisation_type``,
  ``is_memorised``, ``source``), ``label`` (1 memorised, 0 not, NaN left out, per
  ``positives``) and ``hard_negative`` (trained on but not memorised: the testbed's rare canaries).
- ``attribution.parquet`` with ``attribution=true`` (noise_norm only): ``prompt_id,
  token_index, token, attribution``, one row per non-padding token.
- ``metrics.json``: ``unet_calls`` (per-sample UNet evaluations; a guided step costs 2) and
  ``unet_forward_passes`` (batched calls), time, score summaries per ground-truth group and,
  with ground truth, ``roc_auc``, ``tpr_at_fpr`` (at ``fpr``) and the NeMo threshold
  (mean + 1 std of the negatives) with its TPR/FPR, and where the data has hard negatives
  ``ground_truth.hard_negatives`` (memorised vs hard negatives: ROC-AUC, TPR@FPR); plus
  provenance. The console says both AUCs, or why no ROC metric was computed.
- ``roc.png`` with ground truth; ``report.html`` (ranked prompts, ROC curve, tokens shaded by
  their attribution); ``info.json`` and ``_SUCCESS`` last.
"""

from __future__ import annotations

import logging
import time

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from diffmem.config import hydra_app
from diffmem.device import configure_torch
from diffmem.data.prompts import stage_prompts
from diffmem.detectors import Detector, build_detector, count_unet_evals
from diffmem.errors import ConfigError
from diffmem.data.labels import check_positives, describe_positives, ground_truth, ground_truth_labels
from diffmem.metrics.detection import calibrate_threshold, detection_metrics, rates_at_threshold
from diffmem.loading import load_model
from diffmem.report import write_detect_report
from diffmem.report.figures import ROC_FIGURE, roc_figure
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.runs import write_parquet

log = logging.getLogger(__name__)
SCORES = "scores.parquet"
ATTRIBUTION = "attribution.parquet"
GROUND_TRUTH = ("kind", "group", "dup_count", "type", "overfit_type", "memorisation_type", "is_memorised",
                "source", "target_id")


def check_config(cfg: DictConfig) -> Detector:
    """Validate ``cfg`` (before anything is written); returns the configured detector."""
    detector = build_detector(cfg.detect)
    if not 0 <= float(cfg.fpr) < 1:
        raise ConfigError(f"fpr must be in [0, 1) (got {cfg.fpr})")
    if cfg.attribution and not detector.supports_attribution:
        raise ConfigError(f"attribution=true needs a detector with per-token attribution "
                          f"(noise_norm), not '{detector.name}'")
    check_positives(OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None)
    return detector


def score_table(detector: Detector, pipe, prompts: pd.DataFrame, *, seed: int, resolution: int,
                batch_size: int, positives=None) -> pd.DataFrame:
    """The ``scores`` table of ``prompts`` (ids, caption, detector, score, ground truth, label)."""
    scores = detector.score(pipe, prompts["caption"].tolist(), prompts["prompt_id"].tolist(), seed=seed,
                            resolution=resolution, batch_size=batch_size)
    table = pd.DataFrame({"prompt_id": prompts["prompt_id"].to_numpy(),
                          "caption": prompts["caption"].astype(str).to_numpy(),
                          "detector": detector.name, "score": scores})
    for col in GROUND_TRUTH:
        if col in prompts:
            table[col] = prompts[col].to_numpy()
    labels = ground_truth_labels(prompts, positives)
    if labels is not None:
        table["label"] = labels.to_numpy()
        hard = ground_truth(prompts, check_positives(positives)["min_dup_count"])["hard_negative"]
        if hard.any():
            table["hard_negative"] = hard.to_numpy()
    return table


def attribution_table(detector: Detector, pipe, prompts: pd.DataFrame, *, seed: int,
                      resolution: int) -> pd.DataFrame:
    """``prompt_id, token_index, token, attribution`` for every prompt."""
    parts = [detector.attribute(pipe, p.caption, p.prompt_id, seed=seed, resolution=resolution)
             .assign(prompt_id=p.prompt_id) for p in prompts.itertuples(index=False)]
    return pd.concat(parts, ignore_index=True)[["prompt_id", "token_index", "token", "attribution"]]


def evaluate(table: pd.DataFrame, fpr: float = 0.01) -> dict:
    """Ground-truth metrics of a ``scores`` table (empty without a usable ``label`` column)."""
    if "label" not in table:
        return {}
    known = table[table["label"].notna()]
    y, s = known["label"].to_numpy(int), known["score"].to_numpy(float)
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    out: dict = {"n_pos": n_pos, "n_neg": n_neg, "n_excluded": int(len(table) - len(known))}
    if n_pos and "hard_negative" in table:  # memorised vs trained-on-but-not-memorised
        hard = table[(table["label"] == 1) | table["hard_negative"].fillna(False).astype(bool)]
        out["hard_negatives"] = detection_metrics(hard["score"].to_numpy(float),
                                                  hard["label"].eq(1).to_numpy(int), fpr=fpr)
    if n_pos == 0 or n_neg == 0:
        out["note"] = (f"no ROC metrics: {n_pos} positives and {n_neg} negatives among the prompts "
                       "(ROC needs both; see positives=... and the prompts' ground truth)")
        return out
    out.update(detection_metrics(s, y, fpr=fpr))
    if n_neg >= 2:
        thr = calibrate_threshold(s[y == 0])
        out["calibrated_threshold"] = {"rule": "mean + 1 std of negatives",
                                       **rates_at_threshold(s, y, thr)}
    return out


def summary_lines(results: dict) -> list[str]:
    """What the console says about the ground truth: the AUCs, or why there are none."""
    if not results:
        return ["no ROC metrics: the prompts carry no ground truth (a type/overfit_type/memorisation_type "
                "column, a file label, or testbed kind/dup_count)"]
    lines = [f"{results['n_pos']} memorised vs {results['n_neg']} not memorised prompts "
             f"({results['n_excluded']} left out)"]
    if "roc_auc" in results:
        lines.append(f"ROC-AUC {results['roc_auc']:.3f}, TPR@{results['fpr']:g}FPR {results['tpr_at_fpr']:.3f}")
    else:
        lines.append(results["note"])
    if "hard_negatives" in results:
        h = results["hard_negatives"]
        lines.append(f"memorised vs hard negatives ({h['n_neg']} prompts trained on but not memorised): "
                     f"ROC-AUC {h['roc_auc']:.3f}, TPR@{h['fpr']:g}FPR {h['tpr_at_fpr']:.3f}")
    return lines


def group_summary(table: pd.DataFrame) -> list[dict]:
    """Mean / std / n of the score per ground-truth group (testbed kind x dup_count, or type)."""
    keys = ([c for c in ("kind", "dup_count") if c in table] or [c for c in ("type",) if c in table]
            or [c for c in ("memorisation_type",) if c in table])
    if not keys:
        return []
    g = table.groupby(keys, dropna=False)["score"].agg(["mean", "std", "count"]).reset_index()
    g = g.astype(object).where(g.notna(), None)  # std of a single prompt: null, not NaN
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in g.to_dict(orient="records")]


def prepare(cfg: DictConfig) -> tuple[Detector, pd.DataFrame]:
    return check_config(cfg), stage_prompts(cfg)


def body(job: Job) -> Outcome:
    cfg, run_dir, (detector, prompts) = job.cfg, job.dir, job.ctx
    device = configure_torch(cfg)
    positives = OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None
    pipe = load_model(cfg.model, device, scheduler=cfg.scheduler)
    start = time.perf_counter()
    with count_unet_evals(pipe.unet) as used:
        table = score_table(detector, pipe, prompts, seed=cfg.seed, resolution=cfg.resolution,
                            batch_size=cfg.batch_size, positives=positives)
    seconds = time.perf_counter() - start
    write_parquet(run_dir / SCORES, table)
    metrics: dict = {
        "detector": detector.name, "settings": detector.settings(), "model": cfg.model.name,
        "n_prompts": len(table), "score_convention": "higher = more likely memorised",
        "unet_calls": used.evals, "unet_calls_per_prompt": used.evals / len(table),
        "unet_forward_passes": used.calls, "seconds": seconds, "seconds_per_prompt": seconds / len(table),
        "by_group": group_summary(table),
    }
    attr = None
    if cfg.attribution:
        with count_unet_evals(pipe.unet) as used_attr:
            attr = attribution_table(detector, pipe, prompts, seed=cfg.seed, resolution=cfg.resolution)
        write_parquet(run_dir / ATTRIBUTION, attr)
        metrics["unet_calls_attribution"] = used_attr.evals
    results = evaluate(table, cfg.fpr)
    if results:
        metrics["ground_truth"] = {"positives": describe_positives(prompts, positives), **results}
        metrics.update({k: results[k] for k in ("roc_auc", "tpr_at_fpr", "fpr") if k in results})
        if "roc_auc" in results:
            roc_figure(table, run_dir / ROC_FIGURE, title=f"{detector.name} on {cfg.model.name}")
    write_detect_report(run_dir, table, {**metrics, "fpr": cfg.fpr}, attr,
                        title=f"diffmem detect: {detector.name} on {cfg.model.name}")
    log.info("detect: %s scored %d prompts with %d UNet evaluations%s", detector.name, len(table),
             used.evals, f"; ROC-AUC {results['roc_auc']:.3f}" if "roc_auc" in results else "")
    for line in summary_lines(results):
        log.info("detect: %s", line)
    return Outcome({"n_prompts": len(table), "roc_auc": results.get("roc_auc")},
                   {"detector": detector.name, "unet_calls": used.evals}, metrics)


SPEC = StageSpec("detect", body, prepare, volatile=("batch_size",), inputs=lambda cfg, ctx: {"prompt list": ctx[1]})
run = SPEC.run
main = hydra_app("detect", run)

if __name__ == "__main__":
    main()
