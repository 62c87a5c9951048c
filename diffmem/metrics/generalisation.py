"""The memorisation -> generalisation transition (Kadkhodaie et al.): where two models trained on
disjoint subsets start generating the same image for the same noise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from diffmem import training
from diffmem.data import load_dataset, load_images, to_tensor
from diffmem.data.samples import plan_samples
from diffmem.features import build_extractor
from diffmem.loading import load_model
from diffmem.metrics.replication import top1_similarity
from diffmem.models import resolve_device
from diffmem.runs import read_parquet, write_parquet
from diffmem.sampling import decode, generate_images


def nchw(images: np.ndarray) -> torch.Tensor:
    """Decoded uint8 NHWC images as NCHW (the extractors take uint8 as is)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def transition_n(n: npt.ArrayLike, cross: npt.ArrayLike, nn: npt.ArrayLike) -> float | None:
    """The memorisation -> generalisation transition: the first size at which the mean
    cross-model similarity reaches the mean nearest-training similarity.

    Linear interpolation of ``cross - nn`` in log n between the last size below and the
    first at or above; None when the measured sizes bracket no such crossing (including
    when cross >= nn already at the smallest n).
    """
    logn, d = np.log(np.asarray(n, float)), np.asarray(cross, float) - np.asarray(nn, float)
    for i in range(1, len(d)):
        if d[i - 1] < 0 <= d[i]:
            frac = -d[i - 1] / (d[i] - d[i - 1])
            return float(np.exp(logn[i - 1] + frac * (logn[i] - logn[i - 1])))
    return None


def quartile_stats(name: str, values: npt.ArrayLike) -> dict:
    values = np.asarray(values, float)
    return {name: values.mean(), f"{name}_q25": np.percentile(values, 25), f"{name}_q75": np.percentile(values, 75)}


class HeldoutBaseline:
    """The novelty baseline: held-out real images' similarity to the nearest image of each
    model's subset (what "far from the training images" looks like), averaged over models.

    The dataset, the descriptor and the held-out features are loaded once for every n.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.root, manifest = load_dataset(cast(DictConfig, OmegaConf.merge(cfg.data, {"subset": None})))
        self.resolution = cfg.resolution
        self.ext = build_extractor(cfg.features.extractor)
        held = manifest.loc[manifest["split"] == "heldout", "file"].unique() if "split" in manifest else []
        self.held = self._embed(held) if len(held) else None

    def _embed(self, files: Sequence[str]) -> torch.Tensor:
        return self.ext(nchw(load_images(self.root, files, self.resolution)))

    def __call__(self, n_path: Path) -> float:
        if self.held is None:
            return float("nan")
        subsets = read_parquet(n_path / "subsets.parquet")
        return float(
            np.mean(
                [
                    top1_similarity((self.held @ self._embed(g["file"]).T).cpu().numpy()).mean()
                    for _, g in subsets.groupby("model")
                ]
            )
        )


def measure(
    cfg: DictConfig, out: Path, configs: list[DictConfig], parts: list, train: Callable[[DictConfig], Path]
) -> float:
    """Train both models (``train(config)`` returns a run dir with ``model/``), sample the same
    noises with both, write ``pairs``/``subsets`` tables; returns the VAE's reconstruction ceiling."""
    ext = build_extractor(cfg.features.extractor)
    device = resolve_device(cfg.device)
    plan = plan_samples(
        pd.DataFrame({"prompt_id": [0], "caption": [""]}), int(cfg.samples), int(cfg.seed)
    )  # one seed per noise, the same for both models
    feats, nearest, subsets, ceiling = {}, {}, [], []
    for model, tcfg, (root, rows) in zip(("a", "b"), configs, parts):
        pipe = load_model(train(tcfg) / "model", device)
        generate_images(
            pipe,
            plan,
            out / model,
            resolution=cfg.resolution,
            steps=cfg.sample_steps,
            guidance=1.0,
            batch_size=cfg.batch_size,
            desc=f"generate n={cfg.n} {model}",
        )
        feats[model] = ext(nchw(load_images(out / model, plan["file"])))
        real = load_images(root, rows["file"], cfg.resolution)
        real_feats = ext(nchw(real))
        sims = (feats[model] @ real_feats.T).cpu().numpy()
        nearest[model] = (top1_similarity(sims), rows["image_id"].to_numpy()[sims.argmax(1)])
        subsets.append(rows.assign(model=model)[["model", "image_id", "file"]])
        with torch.no_grad():  # a copy can be no closer than the VAE's own reconstruction
            latents = training.encode_latents(pipe.vae, to_tensor(real))
            recon = torch.cat([decode(pipe, z) for z in latents.split(256)])
        ceiling.append((ext(recon) * real_feats).sum(1).cpu())
    fa, fb = feats["a"], feats["b"]
    pairs = plan[["sample_id", "seed"]].assign(
        n=int(cfg.n),
        cross_sim=(fa * fb).sum(1).cpu().numpy(),
        shuffled_sim=(fa * fb.roll(1, 0)).sum(1).cpu().numpy(),  # control: different noises
        nn_sim_a=nearest["a"][0],
        nn_id_a=nearest["a"][1],
        nn_sim_b=nearest["b"][0],
        nn_id_b=nearest["b"][1],
        file_a="a/" + plan["file"],
        file_b="b/" + plan["file"],
    )
    write_parquet(out / "subsets.parquet", pd.concat(subsets, ignore_index=True))
    write_parquet(out / "pairs.parquet", pairs)
    return float(torch.cat(ceiling).mean())
