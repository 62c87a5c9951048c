"""``diffmem audit``: the main job. Does this model replicate its training images?

generate (prompts -> samples) -> embed (samples, training images, held-out real images)
-> index (training set) -> search -> score -> ``metrics.json``, ``generations.parquet``,
``prompts.parquet`` and a self-contained ``report.html``. Every step runs in a sub-folder
of the audit's run dir through the same stage functions as the CLI, so a re-run resumes
after the last finished step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from diffmem import embed, generate
from diffmem.config import hydra_app
from diffmem.data import load_dataset
from diffmem.data.images import without_guards
from diffmem.data.prompts import stage_prompts
from diffmem.data.samples import read_samples, samples_intact
from diffmem.errors import ConfigError
from diffmem.features import check_extractor
from diffmem.features.store import FeatureStore
from diffmem.index import stage as index_stage
from diffmem.index.matches import find_matches, write_matches
from diffmem.metrics import dcr_summary, median_mad, memorisation_rate, replication_rate
from diffmem.runs import (check_claim, claim, config_subset, is_done, mark_done, provenance, reopen, write_json,
                          write_parquet)

log = logging.getLogger(__name__)
MEMORISED_KINDS = ("canary", "template")


def _sub(cfg: DictConfig, node: str, **fields) -> DictConfig:
    """The resolved config of a sub-stage (``cfg[node]``) with ``fields`` filled in."""
    return OmegaConf.merge(OmegaConf.to_container(cfg[node], resolve=True), fields)


def score_generations(samples: pd.DataFrame, matches: pd.DataFrame, refs: pd.DataFrame,
                      threshold: float) -> pd.DataFrame:
    """One row per generation: its top-1 training neighbour, score, and whether it replicates."""
    top = matches[matches["rank"] == 0].set_index("query_id")
    gens = samples.copy()
    gens["top1_score"] = top["score"].reindex(gens["sample_id"]).to_numpy()
    gens["top1_ref_id"] = top["ref_id"].reindex(gens["sample_id"]).to_numpy()
    gens["top1_ref_file"] = top["ref_file"].reindex(gens["sample_id"]).to_numpy()
    gens["replicated"] = gens["top1_score"] > threshold
    if "group" in gens and "group" in refs:
        ref_group = refs.set_index("item_id")["group"]
        matched = ref_group.reindex(gens["top1_ref_id"]).to_numpy()
        has_target = gens["group"].fillna("").astype(str) != ""
        gens["correct_match"] = np.where(has_target, matched == gens["group"].to_numpy(), np.nan)
    return gens


def score_prompts(gens: pd.DataFrame, threshold: float, dcr_threshold: float) -> pd.DataFrame:
    """One row per prompt. ``score_band`` of its max score: ``above`` the replication threshold,
    ``between`` the DCR and the replication thresholds, ``below`` both (score bands, not NeMo's
    verbatim / template classes). ``correct_match_share_of_replicated``: of its generations
    above the threshold, the share whose nearest training image is its own (as in
    ``metrics.json``'s ``by_dup_count``)."""
    keys = [c for c in ("prompt_id", "caption", "kind", "group", "dup_count", "type", "memorisation_type",
                        "is_memorised", "target_file") if c in gens]
    g = gens.groupby(keys, dropna=False, sort=False)
    out = g.agg(n_generations=("sample_id", "size"), max_score=("top1_score", "max"),
                mean_score=("top1_score", "mean"), replicated_share=("replicated", "mean")).reset_index()
    if "correct_match" in gens:
        rep = gens["correct_match"].where(gens["replicated"])
        out["n_replicated"] = g["replicated"].sum().to_numpy().astype(int)
        out["correct_match_share_of_replicated"] = rep.groupby([gens[k] for k in keys], dropna=False,
                                                               sort=False).mean().to_numpy()
    out["memorised"] = out["max_score"] > threshold
    out["score_band"] = np.where(out["memorised"], "above",
                                 np.where(out["max_score"] > dcr_threshold, "between", "below"))
    return out.sort_values("max_score", ascending=False).reset_index(drop=True)


def summarise(gens: pd.DataFrame, prompts: pd.DataFrame, baseline: pd.DataFrame | None,
              threshold: float, dcr_threshold: float) -> dict:
    """Headline numbers; with ground truth, detection against the known duplication counts."""
    out = {
        "threshold": threshold, "dcr_threshold": dcr_threshold,
        "generations": len(gens), "prompts": len(prompts),
        "replication_rate": replication_rate(gens["top1_score"], threshold),
        "flagged_prompt_share": float(prompts["memorised"].mean()),
        "dcr": dcr_summary(gens["top1_score"], dcr_threshold,
                           baseline_top1=None if baseline is None else baseline["top1_score"]),
        "max_score": median_mad(prompts["max_score"]),
    }
    truth = None
    if "kind" in prompts:
        truth = prompts["kind"].isin(MEMORISED_KINDS)
    elif "is_memorised" in prompts:  # a prompt list's ground truth (diffmem.data.prompt_lists)
        truth = prompts["is_memorised"].astype(object).eq(True)
    if truth is not None and truth.any():
        per_prompt = gens[gens["prompt_id"].isin(prompts.loc[truth, "prompt_id"])]
        out["memorisation_rate"] = memorisation_rate(per_prompt, threshold=threshold,
                                                     score_col="top1_score")
        out["memorisation_rate_prompts"] = int(truth.sum())  # its denominator: known memorised prompts
    if "dup_count" in prompts:
        rows = []
        for (kind, dup), grp in prompts.groupby(["kind", "dup_count"], sort=True):
            row = {"kind": kind, "dup_count": int(dup), "prompts": len(grp),
                   "flagged_share": float(grp["memorised"].mean()),
                   "mean_max_score": float(grp["max_score"].mean())}
            if "correct_match" in gens and kind in MEMORISED_KINDS:
                rep = gens[gens["prompt_id"].isin(grp["prompt_id"]) & gens["replicated"]]
                row["correct_match_share_of_replicated"] = float(rep["correct_match"].mean()) if len(rep) else None
            rows.append(row)
        out["by_dup_count"] = rows
    return out


def fingerprint(cfg: DictConfig) -> dict:
    fp = config_subset(cfg, ("model", "data", "prompts", "features", "index", "seed", "n_per_prompt",
                             "k", "baseline_split", "threshold", "dcr_threshold"))
    return {**fp, "data": without_guards(fp["data"])}


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
        raise ConfigError(f"baseline_split={split}: the dataset has no 'split' column; use baseline_split=null "
                          f"(no held-out baseline) or add a split column (train / {split}) to the manifest")
    splits = ", ".join(sorted(map(str, manifest["split"].unique())))
    for needed in (split, "train"):
        if not (manifest["split"] == needed).any():
            raise ConfigError(f"baseline_split={split}: no image has split '{needed}' (splits: {splits}); the "
                              f"audit indexes split=train and embeds split={split} (or use baseline_split=null)")
    return split


def check_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``baseline_split`` resolved, after checking the data, the prompts and the
    settings (nothing is generated or written before this)."""
    manifest = load_dataset(cfg.data)[1]
    stage_prompts(cfg, manifest)
    return OmegaConf.merge(cfg, {"baseline_split": baseline_split(cfg, manifest)})


def _intact(run_dir: Path, cfg: DictConfig) -> bool:
    """Whether a finished audit's samples and feature parts are all complete; if not, the
    damaged sub-runs and the audit are reopened, so that the re-run recomputes the damage."""
    embeds = [run_dir / d for d in ("embed-samples", "embed-train", "embed-baseline") if is_done(run_dir / d)]
    ok = all([samples_intact(run_dir / "generate"), *(FeatureStore(d).intact(cfg.embed.part_size) for d in embeds)])
    if not ok:
        reopen(run_dir)
    return ok


def run(cfg: DictConfig) -> Path:
    """Run the whole audit per ``cfg``; returns the run dir."""
    cfg = check_config(cfg)
    if check_claim(cfg.run_dir, fingerprint(cfg)) and is_done(cfg.run_dir) and _intact(Path(cfg.run_dir), cfg):
        return Path(cfg.run_dir)
    # generate validates the model and prompts before writing anything; claim after it, so
    # a refused audit leaves nothing behind (the descriptor is checked before generating)
    check_extractor(cfg.embed.features.extractor)
    gen_dir = generate.run(_sub(cfg, "generate", run_dir=str(Path(cfg.run_dir) / "generate")))
    run_dir = claim(cfg.run_dir, fingerprint(cfg))
    q_dir = embed.run(_sub(cfg, "embed", run_dir=str(run_dir / "embed-samples"), source="samples",
                           samples_dir=str(gen_dir)))
    ref_dir = embed.run(_sub(cfg, "embed", run_dir=str(run_dir / "embed-train"), source="dataset",
                             split="train" if cfg.baseline_split else None))
    idx_dir = index_stage.run(_sub(cfg, "index_stage", run_dir=str(run_dir / "index"),
                                   features_dir=str(ref_dir)))
    matches = find_matches(idx_dir, q_dir, cfg.k)
    write_matches(run_dir, matches)
    baseline = None
    if cfg.baseline_split:
        b_dir = embed.run(_sub(cfg, "embed", run_dir=str(run_dir / "embed-baseline"), source="dataset",
                               split=cfg.baseline_split))
        b = find_matches(idx_dir, b_dir, 1)
        baseline = b.rename(columns={"query_id": "item_id", "score": "top1_score"})
        write_parquet(run_dir / "baseline.parquet", baseline)

    samples = read_samples(gen_dir)
    refs = FeatureStore(ref_dir).items()
    gens = score_generations(samples, matches, refs, cfg.threshold)
    prompts = score_prompts(gens, cfg.threshold, cfg.dcr_threshold)
    metrics = summarise(gens, prompts, baseline, cfg.threshold, cfg.dcr_threshold)
    store = FeatureStore(ref_dir)
    metrics.update(feature=str(cfg.features.extractor.name), provenance=provenance(cfg),
                   reference_images_skipped=int(store.info().get("n_skipped", 0)))
    warning = store.warning()
    if warning:
        metrics["warning"] = warning
        log.warning("audit: %s; the scores say nothing about memorisation", warning)
    write_parquet(run_dir / "generations.parquet", gens)
    write_parquet(run_dir / "prompts.parquet", prompts)
    write_json(run_dir / "metrics.json", metrics)

    from diffmem.report import write_report

    data_root = load_dataset(cfg.data)[0]
    shown = gens.assign(file_abs=[str(gen_dir / f) for f in gens["file"]],
                        top1_ref_file_abs=[str(data_root / f) for f in gens["top1_ref_file"]])
    write_report(run_dir, shown, prompts, metrics, baseline=baseline,
                 title=f"diffmem audit: {cfg.model.name}")
    mark_done(run_dir, {"memorised_prompts": int(prompts["memorised"].sum())})
    log.info("audit: %d of %d prompts flagged; report: %s", int(prompts["memorised"].sum()),
             len(prompts), run_dir / "report.html")
    return run_dir


main = hydra_app("audit", run)

if __name__ == "__main__":
    main()
