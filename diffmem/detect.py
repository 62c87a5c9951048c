"""``diffmem detect``: score prompts for memorisation without the training set (docs/methods.md section 2).

``detect=noise_ssim`` (the default) ``|noise_norm|one_step|attention_entropy|bright_ending|flipd``
picks the detector (``diffmem.detectors``; docs/detection.md says which to use). Writes to the
run dir:

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
  ``ground_truth.hard_negatives`` (memorised vs hard negatives: ROC-AUC, TPR@FPR), each AUC
  and TPR with a 95 % bootstrap interval over prompts (``roc_auc_ci``, ``tpr_at_fpr_ci``); plus
  provenance. The console says both AUCs, or why no ROC metric was computed.
- ``roc.png`` with ground truth; ``report.html`` (ranked prompts, ROC curve, tokens shaded by
  their attribution); ``info.json`` and ``_SUCCESS`` last.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from diffmem import distributed
from diffmem.config import hydra_app
from diffmem.data.labels import check_positives, describe_positives
from diffmem.data.prompts import stage_prompts
from diffmem.detectors import Detector, UnetCounter, build_detector, count_unet_evals
from diffmem.detectors.scoring import attribution_table, score_table
from diffmem.device import configure_torch
from diffmem.errors import ConfigError
from diffmem.loading import load_model
from diffmem.metrics.detection import evaluate, group_summary, summary_lines
from diffmem.report import write_detect_report
from diffmem.report.figures import ROC_FIGURE, roc_figure
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.runs import write_parquet

log = logging.getLogger(__name__)
SCORES = "scores.parquet"
ATTRIBUTION = "attribution.parquet"


def check_config(cfg: DictConfig) -> Detector:
    """Validate ``cfg`` (before anything is written); returns the configured detector."""
    detector = build_detector(cfg.detect)
    if not 0 <= float(cfg.fpr) < 1:
        raise ConfigError(f"fpr must be in [0, 1) (got {cfg.fpr})")
    if cfg.attribution and not detector.supports_attribution:
        raise ConfigError(
            f"attribution=true needs a detector with per-token attribution (noise_norm), not '{detector.name}'"
        )
    check_positives(
        cast(
            "dict[str, Any] | None",
            OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None,
        )
    )
    return detector


def prepare(cfg: DictConfig) -> tuple[Detector, pd.DataFrame]:
    """The detector and the prompts; testbed prompts carry the model's measured copies (a rare
    canary it copies anyway is no hard negative)."""
    from diffmem.metrics.memorisation import with_copy_shares

    return check_config(cfg), with_copy_shares(stage_prompts(cfg), cfg.model.get("path"))


def body(job: Job) -> Outcome:
    cfg, run_dir, (detector, prompts) = job.cfg, job.dir, job.ctx
    device = configure_torch(cfg)
    positives = cast(
        "dict[str, Any] | None", OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None
    )
    pipe = load_model(cfg.model, device, scheduler=cfg.scheduler)
    start = time.perf_counter()
    with distributed.split():  # each rank scores (and attributes) its share of the prompts
        with count_unet_evals(pipe.unet) as used:
            table = score_table(
                detector,
                pipe,
                prompts,
                seed=cfg.seed,
                resolution=cfg.resolution,
                batch_size=cfg.batch_size,
                positives=positives,
            )
        seconds = time.perf_counter() - start
        attr = used_attr = None
        if cfg.attribution:
            with count_unet_evals(pipe.unet) as used_attr:
                attr = attribution_table(detector, pipe, prompts, seed=cfg.seed, resolution=cfg.resolution)
        calls = _over_ranks(used)
        calls_attr = _over_ranks(used_attr) if used_attr is not None else None
        data_parallel = distributed.dealt_summary()
    if not distributed.is_main():  # rank 0 publishes
        return Outcome(complete=False)
    write_parquet(run_dir / SCORES, table)
    metrics: dict = {
        "detector": detector.name,
        "settings": detector.settings(),
        "model": cfg.model.name,
        "n_prompts": len(table),
        "score_convention": "higher = more likely memorised",
        "unet_calls": calls.evals,
        "unet_calls_per_prompt": calls.evals / len(table),
        "unet_forward_passes": calls.calls,
        "seconds": seconds,
        "seconds_per_prompt": seconds / len(table),
        "by_group": group_summary(table),
    }
    if attr is not None and calls_attr is not None:
        write_parquet(run_dir / ATTRIBUTION, attr)
        metrics["unet_calls_attribution"] = calls_attr.evals
    results = evaluate(table, cfg.fpr, cfg.ci_level)
    if results:
        metrics["ground_truth"] = {"positives": describe_positives(prompts, positives), **results}
        metrics.update(
            {
                k: results[k]
                for k in ("roc_auc", "tpr_at_fpr", "fpr", "roc_auc_ci", "tpr_at_fpr_ci", "ci_level")
                if k in results
            }
        )
        if "roc_auc" in results:
            roc_figure(table, run_dir / ROC_FIGURE, title=f"{detector.name} on {cfg.model.name}")
    write_detect_report(
        run_dir, table, {**metrics, "fpr": cfg.fpr}, attr, title=f"diffmem detect: {detector.name} on {cfg.model.name}"
    )
    log.info(
        "detect: %s scored %d prompts with %d UNet evaluations%s",
        detector.name,
        len(table),
        calls.evals,
        f"; ROC-AUC {results['roc_auc']:.3f}" if "roc_auc" in results else "",
    )
    for line in summary_lines(results):
        log.info("detect: %s", line)
    return Outcome(
        {"n_prompts": len(table), "roc_auc": results.get("roc_auc")},
        {"detector": detector.name, "unet_calls": calls.evals, "data_parallel": data_parallel},
        metrics,
    )


def _over_ranks(used: UnetCounter) -> UnetCounter:
    """The UNet usage of every rank together."""
    counts = distributed.all_gather((used.calls, used.evals))
    return UnetCounter(sum(c for c, _ in counts), sum(e for _, e in counts))


SPEC = StageSpec(
    "detect",
    body,
    prepare,
    volatile=("batch_size",),
    inputs=lambda cfg, ctx: {"prompt list": ctx[1]},
    data_parallel=True,
)
run = SPEC.run
main = hydra_app("detect", run)

if __name__ == "__main__":
    main()
