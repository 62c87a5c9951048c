"""The audit's scores: each generation against its nearest training images, each prompt by its
best generation, and the headline numbers (with ground truth: by known duplication count)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffmem.metrics.aggregate import median_mad
from diffmem.metrics.replication import dcr_summary, memorisation_rate, replication_rate

MEMORISED_KINDS = ("canary", "template")


def score_generations(
    samples: pd.DataFrame, matches: pd.DataFrame, refs: pd.DataFrame, threshold: float
) -> pd.DataFrame:
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
    keys = [
        c
        for c in (
            "prompt_id",
            "caption",
            "kind",
            "group",
            "dup_count",
            "type",
            "memorisation_type",
            "is_memorised",
            "target_file",
        )
        if c in gens
    ]
    g = gens.groupby(keys, dropna=False, sort=False)
    out = g.agg(
        n_generations=("sample_id", "size"),
        max_score=("top1_score", "max"),
        mean_score=("top1_score", "mean"),
        replicated_share=("replicated", "mean"),
    ).reset_index()
    if "correct_match" in gens:
        rep = gens["correct_match"].where(gens["replicated"])
        out["n_replicated"] = g["replicated"].sum().to_numpy().astype(int)
        out["correct_match_share_of_replicated"] = (
            rep.groupby([gens[k] for k in keys], dropna=False, sort=False).mean().to_numpy()
        )
    out["memorised"] = out["max_score"] > threshold
    out["score_band"] = np.where(
        out["memorised"], "above", np.where(out["max_score"] > dcr_threshold, "between", "below")
    )
    return out.sort_values("max_score", ascending=False).reset_index(drop=True)


def summarise(
    gens: pd.DataFrame, prompts: pd.DataFrame, baseline: pd.DataFrame | None, threshold: float, dcr_threshold: float
) -> dict:
    """Headline numbers; with ground truth, detection against the known duplication counts."""
    out = {
        "threshold": threshold,
        "dcr_threshold": dcr_threshold,
        "generations": len(gens),
        "prompts": len(prompts),
        "replication_rate": replication_rate(gens["top1_score"], threshold),
        "flagged_prompt_share": float(prompts["memorised"].mean()),
        "dcr": dcr_summary(
            gens["top1_score"], dcr_threshold, baseline_top1=None if baseline is None else baseline["top1_score"]
        ),
        "max_score": median_mad(prompts["max_score"]),
    }
    truth = None
    if "kind" in prompts:
        truth = prompts["kind"].isin(MEMORISED_KINDS)
    elif "is_memorised" in prompts:  # a prompt list's ground truth (diffmem.data.prompt_lists)
        truth = prompts["is_memorised"].astype(object).eq(True)
    if truth is not None and truth.any():
        per_prompt = gens[gens["prompt_id"].isin(prompts.loc[truth, "prompt_id"])]
        out["memorisation_rate"] = memorisation_rate(per_prompt, threshold=threshold, score_col="top1_score")
        out["memorisation_rate_prompts"] = int(truth.sum())  # its denominator: known memorised prompts
    if "dup_count" in prompts:
        rows = []
        for (kind, dup), grp in prompts.groupby(["kind", "dup_count"], sort=True):
            row = {
                "kind": kind,
                "dup_count": int(dup),
                "prompts": len(grp),
                "flagged_share": float(grp["memorised"].mean()),
                "mean_max_score": float(grp["max_score"].mean()),
            }
            if "correct_match" in gens and kind in MEMORISED_KINDS:
                rep = gens[gens["prompt_id"].isin(grp["prompt_id"]) & gens["replicated"]]
                row["correct_match_share_of_replicated"] = float(rep["correct_match"].mean()) if len(rep) else None
            rows.append(row)
        out["by_dup_count"] = rows
    return out
