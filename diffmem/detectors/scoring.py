"""A detector's scores as a table of prompts, with their ground truth and label, and the
per-token attributions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from diffmem import distributed
from diffmem.data.labels import check_positives, ground_truth, ground_truth_labels
from diffmem.detectors.base import Detector

if TYPE_CHECKING:
    import numpy as np
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

#: prompt columns carried into a scores table (testbed and prompt-list ground truth)
GROUND_TRUTH = (
    "kind",
    "group",
    "dup_count",
    "type",
    "overfit_type",
    "memorisation_type",
    "is_memorised",
    "source",
    "target_id",
    "copy_share",
)


def score_table(
    detector: Detector,
    pipe: StableDiffusionPipeline,
    prompts: pd.DataFrame,
    *,
    seed: int,
    resolution: int,
    batch_size: int,
    positives: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The ``scores`` table of ``prompts`` (ids, caption, detector, score, ground truth, label)."""
    scores = detector.score(
        pipe,
        prompts["caption"].tolist(),
        prompts["prompt_id"].tolist(),
        seed=seed,
        resolution=resolution,
        batch_size=batch_size,
    )
    table = pd.DataFrame(
        {
            "prompt_id": prompts["prompt_id"].to_numpy(),
            "caption": prompts["caption"].astype(str).to_numpy(),
            "detector": detector.name,
            "score": scores,
        }
    )
    for col in GROUND_TRUTH:
        if col in prompts:
            table[col] = prompts[col].to_numpy()
    labels = ground_truth_labels(prompts, positives)
    if labels is not None:
        table["label"] = labels.to_numpy()
        truth = ground_truth(prompts, check_positives(positives)["min_dup_count"])
        assert truth is not None  # it gave the labels above
        hard = truth["hard_negative"]
        if hard.any():
            table["hard_negative"] = hard.to_numpy()
    return table


def attribution_table(
    detector: Detector, pipe: StableDiffusionPipeline, prompts: pd.DataFrame, *, seed: int, resolution: int
) -> pd.DataFrame:
    """``prompt_id, token_index, token, attribution`` for every prompt (the ranks of a split
    stage take a share of the prompts each)."""

    def attribute(idx: np.ndarray) -> list[pd.DataFrame]:
        return [
            detector.attribute(pipe, p.caption, p.prompt_id, seed=seed, resolution=resolution).assign(
                prompt_id=p.prompt_id
            )
            for p in prompts.iloc[idx].itertuples(index=False)
        ]

    parts = distributed.deal(len(prompts), attribute)
    return pd.concat(parts, ignore_index=True)[["prompt_id", "token_index", "token", "attribution"]]
