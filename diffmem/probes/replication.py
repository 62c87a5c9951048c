"""Does a conditioning regenerate its target image? Generation + descriptor similarity.

The probes judge replication the way the audit does: the similarity of each generation to
the target training image under the configured descriptor (SSCD on real models, pixels on
the testbed), and the memorisation rate (MR, :func:`diffmem.metrics.memorisation_rate`)
over prompts at the descriptor's replication threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL import Image

from diffmem import distributed
from diffmem.metrics import memorisation_rate
from diffmem.runs import atomic_path
from diffmem.sampling import encode_prompts, sample, sample_seed, to_uint8

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    from diffmem.features.base import Extractor


def sample_images(
    pipe: StableDiffusionPipeline,
    cond: torch.Tensor,
    seeds: Sequence[int],
    *,
    resolution: int,
    steps: int,
    guidance: float,
    batch_size: int = 32,
) -> torch.Tensor:
    """One image per (conditioning row, seed), in batches: ``[N, 3, H, W]`` in [0, 1], CPU (the
    ranks of a split stage generate a share of the batches each)."""
    uncond = encode_prompts(pipe, [""])

    def generate(rows: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            c = cond[torch.as_tensor(batch)].to(pipe.unet.device, pipe.unet.dtype)
            out.append(sample(pipe, c, [seeds[j] for j in batch], resolution, steps, guidance, uncond=uncond).cpu())
        return torch.cat(out)

    return distributed.deal(len(seeds), generate, batch_size)


@torch.no_grad()
def similarity_to_targets(
    extractor: Extractor, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 32
) -> np.ndarray:
    """Cosine similarity of each image to its own target (row-aligned): ``[N]``, ``batch_size`` rows at a time."""
    out = [
        (extractor(a.float()) * extractor(b.float())).sum(1).double().cpu()
        for a, b in zip(images.split(batch_size), targets.split(batch_size))
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


def replication_table(
    pipe: StableDiffusionPipeline,
    extractor: Extractor,
    conds: torch.Tensor,
    targets: torch.Tensor,
    keys: pd.DataFrame,
    *,
    n_per_prompt: int,
    seed: int,
    resolution: int,
    steps: int,
    guidance: float,
    batch_size: int = 32,
    image_dir: Path | None = None,
) -> pd.DataFrame:
    """Generate ``n_per_prompt`` images per conditioning row and score each against its target.

    ``keys`` (one row per conditioning, with a ``prompt_id``) is repeated per generation;
    generation ``k`` of a row uses the seed ``sample_seed(seed, prompt_id, k)``, the same noise
    the prompt's baseline generations use, so rows differ only in the conditioning. With
    ``image_dir`` the generations are kept as PNGs there (``image`` column: the file name).
    """
    rep = np.repeat(np.arange(len(keys)), n_per_prompt)
    table = keys.iloc[rep].reset_index(drop=True)
    table["k"] = np.tile(np.arange(n_per_prompt), len(keys))
    seeds = [sample_seed(seed, p, k) for p, k in zip(table["prompt_id"], table["k"])]
    names = [f"{i:04d}.png" for i in range(len(table))]

    def generate(rows: np.ndarray) -> np.ndarray:  # the similarities of these rows (and their PNGs)
        take = torch.as_tensor(rep[rows])
        images = sample_images(
            pipe,
            conds[take],
            [seeds[i] for i in rows],
            resolution=resolution,
            steps=steps,
            guidance=guidance,
            batch_size=batch_size,
        )
        if image_dir is not None:
            for i, img in zip(rows, to_uint8(images)):
                with atomic_path(Path(image_dir) / names[i]) as tmp:
                    Image.fromarray(img).save(tmp, format="PNG")
        return similarity_to_targets(extractor, images, targets[take], batch_size)

    # the ranks of a split stage take whole batches each
    table["similarity"] = distributed.deal(len(table), generate, batch_size)
    if image_dir is not None:
        table["image"] = names
    return table


def mr(table: pd.DataFrame, threshold: float, by: str = "prompt_id", reduction: str = "any") -> float:
    """Memorisation rate of a replication table over its ``by`` groups."""
    return memorisation_rate(table, threshold=threshold, reduction=reduction, prompt_col=by, score_col="similarity")
