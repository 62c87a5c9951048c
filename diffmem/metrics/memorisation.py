"""How strongly a testbed model reproduces its training images (the ``train`` stage's
``evaluate`` figures, written to ``memorisation.json`` beside the model), by canary
duplication count: pixel RMSE to the training images, and optionally a descriptor's
cosine similarity."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from diffmem.data import load_images, to_tensor
from diffmem.data.prompts import prompts_from_testbed
from diffmem.features import build_extractor
from diffmem.runs import read_json
from diffmem.sampling import encode_prompts, sample, sample_seed

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline


def with_copy_shares(prompts: pd.DataFrame, model_dir: str | Path | None) -> pd.DataFrame:
    """Testbed ``prompts`` (``kind``, ``dup_count``) with ``copy_share``: per caption, the share
    of the model's evaluation generations that copy the prompt's own training image
    (``per_generation`` of ``model_dir``'s ``memorisation.json``, written by training; NaN for a caption it did
    not evaluate), so the ground truth knows which rare canaries the model copies anyway
    (:func:`~diffmem.data.labels.ground_truth`). Other prompts, or a model without the file
    (a hub id, a model not trained here), are returned as they are."""
    from diffmem.data.labels import COPY_SHARE
    from diffmem.training import MEMORISATION_JSON

    path = Path(model_dir) / MEMORISATION_JSON if model_dir else None
    if path is None or not {"kind", "dup_count"} <= set(prompts) or not path.is_file():
        return prompts
    gens = pd.DataFrame(read_json(path).get("per_generation") or [])
    if gens.empty or not {"caption", "copy"} <= set(gens):
        return prompts
    return prompts.assign(**{COPY_SHARE: prompts["caption"].map(gens.groupby("caption")["copy"].mean())})


def pairwise_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMSE between every row of ``a`` [N, ...] and of ``b`` [M, ...] -> [N, M]."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T
    return (sq.clamp_min(0) / a.shape[1]).sqrt().float()


def memorisation_figures(
    pipe: StableDiffusionPipeline,
    root: str | Path,
    manifest: pd.DataFrame,
    n_seeds: int = 8,
    steps: int = 25,
    guidance: float = 5.0,
    copy_rmse: float = 0.3,
    batch_size: int = 64,
    seed: int = 0,
    n_ordinary: int = 16,
    n_heldout: int = 16,
    descriptor: str | None = None,
    descriptor_threshold: float = 0.7,
) -> dict:
    """How strongly the model reproduces its training images, by canary duplication count.

    Generates ``n_seeds`` images per testbed prompt and measures pixel RMSE (images on
    [-1, 1]) to the prompt's own training image(s) and to the nearest training image.
    A generation is a *copy* when that RMSE is below ``copy_rmse``. The baseline is the
    nearest-training-image RMSE of held-out real images (what "novel" looks like).
    With ``descriptor`` (a registered feature name, e.g. ``sscd_distilled``) the same
    figures in its cosine similarity stand beside them: a *descriptor copy* is a generation
    whose most similar training image is its prompt's own, above ``descriptor_threshold``.
    """
    res = pipe.vae.config.sample_size
    prompts = prompts_from_testbed(manifest, n_ordinary=n_ordinary, n_heldout=n_heldout, seed=seed)
    rows = prompts.loc[prompts.index.repeat(n_seeds)].reset_index(drop=True)
    rows["k"] = list(range(n_seeds)) * len(prompts)
    seeds = [sample_seed(seed, p, k) for p, k in zip(rows["prompt_id"], rows["k"])]
    uncond = encode_prompts(pipe, [""])
    batches: list[torch.Tensor] = []
    for i in range(0, len(rows), batch_size):
        cond = encode_prompts(pipe, rows["caption"].iloc[i : i + batch_size].tolist())
        batches.append(sample(pipe, cond, seeds[i : i + batch_size], res, steps, guidance, uncond=uncond))
    gens = torch.cat(batches).cpu() * 2 - 1
    train = manifest[manifest["split"] == "train"].drop_duplicates("file").reset_index(drop=True)
    real = to_tensor(load_images(root, train["file"], res))
    dist = pairwise_rmse(gens, real)
    rows["nn_rmse"] = dist.min(1).values.numpy()
    rows["nn_group"] = train["group"].to_numpy()[dist.argmin(1).numpy()]
    own = []
    for r, d in zip(rows.itertuples(), dist):
        mask = torch.from_numpy((train["group"] == r.group).to_numpy(copy=True)) if r.group else None
        own.append(float(d[mask].min()) if mask is not None and mask.any() else float("nan"))
    rows["own_rmse"] = own
    rows["copy"] = rows["own_rmse"] < copy_rmse
    rows["near_copy"] = rows["nn_rmse"] < copy_rmse
    held = manifest[manifest["split"] == "heldout"].drop_duplicates("file")
    held_real = to_tensor(load_images(root, held["file"], res))
    held_d = pairwise_rmse(held_real, real).min(1).values
    held_sim: torch.Tensor | None = None
    if descriptor is not None:
        ext = build_extractor(descriptor, device="cpu")
        ref = ext((real + 1) / 2)
        sim = ext((gens + 1) / 2) @ ref.T
        groups = train["group"].to_numpy()
        rows["nn_sim"] = sim.max(1).values.numpy()
        rows["nn_sim_group"] = groups[sim.argmax(1).numpy()]
        rows["own_sim"] = [
            float(s[torch.from_numpy(groups == r.group)].max()) if r.group else float("nan")
            for r, s in zip(rows.itertuples(), sim)
        ]
        rows["sim_copy"] = (rows["nn_sim_group"] == rows["group"]) & (rows["nn_sim"] > descriptor_threshold)
        held_sim = (ext((held_real + 1) / 2) @ ref.T).max(1).values
    summary = []
    for (kind, dup), g in rows.groupby(["kind", "dup_count"], sort=True):
        summary.append(
            {
                "kind": kind,
                "dup_count": int(dup),
                "prompts": int(g["prompt_id"].nunique()),
                "generations": len(g),
                "copy_share": float(g["copy"].mean()) if kind in ("canary", "template") else None,
                "median_own_rmse": float(g["own_rmse"].median()) if kind in ("canary", "template") else None,
                "near_copy_share": float(g["near_copy"].mean()),
                "median_nn_rmse": float(g["nn_rmse"].median()),
            }
        )
        if descriptor is not None:
            special = kind in ("canary", "template")
            summary[-1].update(
                {
                    "sim_copy_share": float(g["sim_copy"].mean()) if special else None,
                    "median_own_sim": float(g["own_sim"].median()) if special else None,
                    "median_nn_sim": float(g["nn_sim"].median()),
                    "max_nn_sim": float(g["nn_sim"].max()),
                }
            )
    out = {
        "copy_rmse": copy_rmse,
        "n_seeds": n_seeds,
        "steps": steps,
        "guidance": guidance,
        "summary": summary,
        "heldout_real_nn_rmse": {
            "median": float(held_d.median()),
            "p05": float(held_d.quantile(0.05)),
            "share_below_copy_rmse": float((held_d < copy_rmse).float().mean()),
        },
    }
    if descriptor is not None:
        assert held_sim is not None  # computed with the descriptor above
        out["descriptor"] = {"name": descriptor, "threshold": descriptor_threshold}
        out["heldout_real_nn_sim"] = {
            "median": float(held_sim.median()),
            "p95": float(held_sim.quantile(0.95)),
            "max": float(held_sim.max()),
            "share_above_threshold": float((held_sim > descriptor_threshold).float().mean()),
        }
    out["per_generation"] = pd.DataFrame(rows).drop(columns=["target_file"]).to_dict("records")
    return out
