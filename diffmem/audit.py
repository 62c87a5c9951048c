"""``diffmem audit``: the main job. Does this model replicate its training images?

generate (prompts -> samples) -> embed (samples, training images, held-out real images)
-> index (training set) -> search -> score -> ``metrics.json``, ``generations.parquet``,
``prompts.parquet`` and a self-contained ``report.html``. Every step runs in a sub-folder
of the audit's run dir through the same stage functions as the CLI, so a re-run resumes
after the last finished step.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from diffmem import embed, generate
from diffmem.config import hydra_app
from diffmem.data import load_dataset
from diffmem.data.datasets import on_error
from diffmem.data.prompts import stage_prompts
from diffmem.data.samples import read_samples
from diffmem.errors import ConfigError
from diffmem.features import check_extractor
from diffmem.features.store import FeatureStore
from diffmem.index import stage as index_stage
from diffmem.index.matches import find_matches, write_matches
from diffmem.metrics.audit import score_generations, score_prompts, summarise
from diffmem.runner import Job, Outcome, StageSpec, on_error_guard
from diffmem.runs import provenance, write_parquet

log = logging.getLogger(__name__)


def _sub(cfg: DictConfig, node: str, **fields: Any) -> DictConfig:
    """The resolved config of a sub-stage (``cfg[node]``) with ``fields`` filled in."""
    return cast(DictConfig, OmegaConf.merge(OmegaConf.to_container(cfg[node], resolve=True), fields))


def baseline_split(cfg: DictConfig, manifest: pd.DataFrame) -> str | None:
    """The held-out split the baseline embeds (``baseline_split``; ``auto``: ``heldout`` when the
    data has such a split column, else none), checked against the data before any generation."""
    split = cfg.baseline_split
    has_split = "split" in manifest
    if split == "auto":
        return "heldout" if has_split and (manifest["split"] == "heldout").any() else None
    if split is None:
        return None
    if not has_split:
        raise ConfigError(
            f"baseline_split={split}: the dataset has no 'split' column; use baseline_split=null "
            f"(no held-out baseline) or add a split column (train / {split}) to the manifest"
        )
    splits = ", ".join(sorted(map(str, manifest["split"].unique())))
    for needed in (split, "train"):
        if not (manifest["split"] == needed).any():
            raise ConfigError(
                f"baseline_split={split}: no image has split '{needed}' (splits: {splits}); the "
                f"audit indexes split=train and embeds split={split} (or use baseline_split=null)"
            )
    return split


def check_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``baseline_split`` resolved, after checking the data, the prompts and the
    settings (nothing is generated or written before this)."""
    manifest = load_dataset(cfg.data)[1]
    stage_prompts(cfg, manifest)
    return cast(DictConfig, OmegaConf.merge(cfg, {"baseline_split": baseline_split(cfg, manifest)}))


def prepare(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``baseline_split`` resolved, after checking the data, the prompts, the settings
    and the descriptor (nothing is generated or written before this)."""
    manifest = load_dataset(cfg.data)[1]
    stage_prompts(cfg, manifest)
    check_extractor(cfg.embed.features.extractor)
    return cast(DictConfig, OmegaConf.merge(cfg, {"baseline_split": baseline_split(cfg, manifest)}))


def body(job: Job) -> Outcome:
    """generate -> embed -> index -> search -> score, each step a sub-run that resumes."""
    cfg, run_dir = job.ctx, job.dir
    gen_dir = generate.run(_sub(cfg, "generate", run_dir=str(run_dir / "generate")))
    q_dir = embed.run(
        _sub(cfg, "embed", run_dir=str(run_dir / "embed-samples"), source="samples", samples_dir=str(gen_dir))
    )
    ref_dir = embed.run(
        _sub(
            cfg,
            "embed",
            run_dir=str(run_dir / "embed-train"),
            source="dataset",
            split="train" if cfg.baseline_split else None,
        )
    )
    idx_dir = index_stage.run(_sub(cfg, "index_stage", run_dir=str(run_dir / "index"), features_dir=str(ref_dir)))
    matches = find_matches(idx_dir, q_dir, cfg.k)
    write_matches(run_dir, matches)
    baseline = None
    if cfg.baseline_split:
        b_dir = embed.run(
            _sub(cfg, "embed", run_dir=str(run_dir / "embed-baseline"), source="dataset", split=cfg.baseline_split)
        )
        b = find_matches(idx_dir, b_dir, 1)
        baseline = b.rename(columns={"query_id": "item_id", "score": "top1_score"})
        write_parquet(run_dir / "baseline.parquet", baseline)

    samples = read_samples(gen_dir)
    store = FeatureStore(ref_dir)
    gens = score_generations(samples, matches, store.items(), cfg.threshold)
    prompts = score_prompts(gens, cfg.threshold, cfg.dcr_threshold)
    metrics = summarise(gens, prompts, baseline, cfg.threshold, cfg.dcr_threshold)
    skipped = int(store.info().get("n_skipped", 0))
    metrics.update(feature=str(cfg.features.extractor.name), reference_images_skipped=skipped)
    warning = store.warning()
    if warning:
        metrics["warning"] = warning
        log.warning("audit: %s; the scores say nothing about memorisation", warning)
    write_parquet(run_dir / "generations.parquet", gens)
    write_parquet(run_dir / "prompts.parquet", prompts)

    from diffmem.report import write_report

    data_root = load_dataset(cfg.data)[0]
    shown = gens.assign(
        file_abs=[str(gen_dir / f) for f in gens["file"]],
        top1_ref_file_abs=[str(data_root / f) for f in gens["top1_ref_file"]],
    )
    write_report(
        run_dir,
        shown,
        prompts,
        {**metrics, "provenance": provenance(cfg)},
        baseline=baseline,
        title=f"diffmem audit: {cfg.model.name}",
    )
    log.info(
        "audit: %d of %d prompts flagged; report: %s",
        int(prompts["memorised"].sum()),
        len(prompts),
        run_dir / "report.html",
    )
    return Outcome(
        {"memorised_prompts": int(prompts["memorised"].sum()), "n_skipped": skipped},
        {"feature": str(cfg.features.extractor.name)},
        metrics,
    )


SPEC = StageSpec(
    "audit",
    body,
    prepare,
    extra=lambda cfg, ctx: {"baseline_split": ctx.baseline_split},
    guard=lambda cfg, summary: on_error_guard(on_error(cfg.data), summary.get("n_skipped", 0)),
)
run = SPEC.run
main = hydra_app("audit", run)

if __name__ == "__main__":
    main()
