"""A model judged on the three axes of a mitigation: memorisation as prompted, memorisation
under trigger search, and utility; and MemControl's Pareto points beside other runs'."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from diffmem.features.base import Extractor
    from diffmem.features.clip import ClipExtractor
    from diffmem.probes.context import ProbeContext


def evaluate_model(
    ctx: ProbeContext,
    ts: dict,
    utility_rows: pd.DataFrame,
    real: torch.Tensor,
    u: DictConfig,
    util_extractor: Extractor,
    clip: ClipExtractor | None = None,
) -> dict:
    """The three axes for the model in ``ctx`` (parts cached under ``ctx.run_dir``)."""
    from diffmem.mitigations.objectives import utility
    from diffmem.probes.context import attack, attack_summary, baseline_summary
    from diffmem.sampling import encode_prompts

    base = ctx.baseline("model")
    attacked = pd.concat(
        [attack(ctx, "target", i, ts, f"attack-target-{i}") for i in range(len(ctx.targets))], ignore_index=True
    )
    util = ctx.json_part(
        "utility",
        lambda: utility(
            ctx.pipe,
            util_extractor,
            encode_prompts(ctx.pipe, utility_rows["caption"].tolist()),
            np.arange(len(utility_rows)),
            real,
            n_per_prompt=int(u.n_per_prompt),
            seed=ctx.seed,
            resolution=ctx.resolution,
            steps=ctx.steps,
            guidance=ctx.guidance,
            batch_size=ctx.batch_size,
            clip=clip,
            captions=utility_rows["caption"].tolist(),
        ),
    )
    b, a = baseline_summary(ctx, base), attack_summary(ctx, attacked)
    return {
        "mr": b["mr"],
        "similarity": b["similarity"],
        "mr_attacked": a["mr"],
        "similarity_attacked": a["similarity"],
        "fd": util["fd"],
        "diversity": util.get("diversity", float("nan")),
        **({"clip_score": util["clip_score"]} if "clip_score" in util else {}),
    }


def pareto_points(study: DictConfig, runs: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's trials (with their ``pareto`` flag) and each named mitigate run's objectives."""
    from diffmem.mitigations.memcontrol import storage_url, study_table
    from diffmem.mitigations.objectives import read_objectives

    trials = study_table(storage_url(study.path), str(study.name))
    rows = []
    for name, path in runs.items():
        o = read_objectives(path, f"pareto_runs.{name}")
        rows.append({"run": name, "memorisation": o["memorisation"], "fd": o["fd"]})
    return trials, pd.DataFrame(rows, columns=["run", "memorisation", "fd"])
