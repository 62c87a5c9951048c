"""Which prompts a study works on: memorised targets, non-memorised prompts, controls, and
the targets' training images (shared by the probe, mitigate and evaluate-mitigation stages)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from diffmem.data.datasets import load_image
from diffmem.data.labels import ground_truth_labels
from diffmem.errors import DataError


def split_prompts(
    prompts: pd.DataFrame, positives: Mapping[str, Any] | None, stage: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(memorised, non-memorised) prompts by their ground truth; ``stage`` names the errors."""
    labels = ground_truth_labels(prompts, positives)
    if labels is None:
        raise DataError(
            f"{stage}: the prompts carry no ground truth (testbed kind/dup_count, a `type`, "
            "`overfit_type` or `memorisation_type` column, or a file label: prompts.label=positive), "
            "so the memorised prompts are unknown"
        )
    memorised = prompts[labels == 1]
    if memorised.empty:
        raise DataError(f"{stage}: no memorised prompt among the prompts (check `positives`)")
    return memorised, prompts[labels == 0]


def select_prompts(
    prompts: pd.DataFrame,
    positives: Mapping[str, Any] | None,
    max_targets: int | None,
    n_controls: int,
    stage: str = "probe",
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(targets, negatives, controls): memorised prompts, non-memorised prompts, and the first
    ``n_controls`` non-memorised prompts that have a training image."""
    targets, negatives = split_prompts(prompts, positives, stage)
    check_targets(targets, stage)
    if max_targets is not None:
        targets = targets.head(int(max_targets))
    if "kind" in negatives:
        trained = negatives[negatives["kind"] == "ordinary"]
    else:
        trained = negatives
    controls = trained[trained["target_file"].notna()].head(int(n_controls))
    return targets.reset_index(drop=True), negatives.reset_index(drop=True), controls.reset_index(drop=True)


def check_targets(targets: pd.DataFrame, stage: str) -> None:
    """Every memorised prompt names its training image (``target_file``, or ``target_id``
    resolved against the dataset when the prompts are loaded)."""
    if "target_file" not in targets:
        raise DataError(
            f"{stage}: the prompt list has no `target_file` column (the training image of each "
            "prompt, relative to data.root) nor a `target_id` column (an image_id of data=...)"
        )
    missing = targets[targets["target_file"].isna() | (targets["target_file"].astype(str) == "")]
    if not missing.empty:
        raise DataError(f"{stage}: memorised prompt {missing.iloc[0]['caption']!r} has no target_file")


def load_targets(root: Path, rows: pd.DataFrame, resolution: int, resize: bool) -> torch.Tensor:
    """The rows' training images ``[N, 3, H, W]`` in [0, 1]; wrong sizes are an error unless ``resize``."""
    if rows.empty:
        return torch.zeros(0, 3, resolution, resolution)
    images = []
    for f in rows["target_file"]:
        img = load_image(root / str(f), resolution if resize else None)
        check_target(torch.from_numpy(img).permute(2, 0, 1)[None], resolution, [str(root / str(f))])
        images.append(img)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def check_target(images: torch.Tensor, resolution: int, names: Sequence[str]) -> None:
    """Targets must be ``[B, 3, resolution, resolution]``: the model's own training size."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"target images must be [B, 3, H, W] RGB, got {tuple(images.shape)}")
    if images.shape[-2:] != (resolution, resolution):
        raise DataError(
            f"target image {names[0]!r} is {images.shape[-1]}x{images.shape[-2]}; the model "
            f"generates {resolution}x{resolution} (resize it or set resolution)"
        )
