"""What a mitigation is judged on while it is being built (MemControl's two objectives).

- memorisation: Wen et al.'s noise norm (first sampling step, one generation per prompt) on
  the memorised prompts, averaged; lower = less memorisation;
- quality: the Fréchet distance, in the configured descriptor space, between generations for
  prompts and those prompts' real images; lower = better.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch

from diffmem.errors import DataError
from diffmem.metrics.utility import clip_score, diversity, frechet_distance
from diffmem.probes.replication import sample_images
from diffmem.runs import read_json, write_json
from diffmem.sampling import encode_prompts, sample_seed

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from omegaconf import DictConfig

    from diffmem.features.base import Extractor
    from diffmem.features.clip import ClipExtractor

OBJECTIVES = "objectives.json"  # a mitigate run's two objectives, measured on its published model


def read_objectives(run_dir: str | os.PathLike[str], what: str = "run_dir") -> dict:
    """A mitigate run's objectives (``memorisation``, ``fd``, ...); its absence is a DataError."""
    path = Path(str(run_dir)) / OBJECTIVES
    if not path.exists():
        raise DataError(f"{what}: {path} does not exist (a mitigate run with objectives)")
    return read_json(path)


def measured_objectives(run_dir: Path, measure: Callable[[], dict[str, Any]]) -> dict:
    """The run's objectives, measured once (``measure()``) and stored in its ``objectives.json``."""
    path = Path(run_dir) / OBJECTIVES
    if not path.exists():
        write_json(path, measure())
    return read_objectives(run_dir)


def measure_objectives(
    cfg: DictConfig, model_dir: Path, root: Path, manifest: pd.DataFrame, memorised: pd.DataFrame, sampling: dict
) -> dict:
    """MemControl's objectives on a published model: memorisation (mean first-step noise norm on the
    memorised prompts) and quality (Fréchet distance of generations for held-out captions to those
    held-out images, in the ``objectives.features`` space)."""
    from omegaconf import OmegaConf

    from diffmem.data import load_unit_images
    from diffmem.features import build_extractor
    from diffmem.loading import load_model
    from diffmem.models import resolve_device

    o = cfg.objectives
    pipe = load_model(
        {**cast("dict[str, Any]", OmegaConf.to_container(cfg.model, resolve=True)), "path": str(model_dir)},
        resolve_device(cfg.device),
        scheduler=cfg.scheduler,
    )
    mem_cond = encode_prompts(pipe, memorised["caption"].tolist())
    score = memorisation(pipe, mem_cond, memorised["prompt_id"], seed=int(cfg.seed), **sampling)
    rows = real_rows(manifest, o.split, int(o.n_prompts), int(cfg.seed), o.get("kinds"))
    extractor = build_extractor(o.features, device=str(pipe.unet.device))
    real = load_unit_images(root, rows["file"], int(cfg.resolution))
    util = utility(
        pipe,
        extractor,
        encode_prompts(pipe, rows["caption"].tolist()),
        np.arange(len(rows)),
        real,
        n_per_prompt=int(o.n_per_prompt),
        seed=int(cfg.seed),
        batch_size=int(cfg.batch_size),
        **sampling,
    )
    return {
        "memorisation": score,
        "fd": util["fd"],
        "n_memorised": len(memorised),
        "n_utility_prompts": len(rows),
        "utility_split": str(o.split),
        "features": extractor.info(),
    }


def memorisation(
    pipe: StableDiffusionPipeline,
    cond: torch.Tensor,
    prompt_ids: Sequence[int] | np.ndarray,
    *,
    seed: int,
    resolution: int,
    steps: int,
    guidance: float,
) -> float:
    """Mean first-step noise norm over ``cond``'s prompts."""
    from diffmem.detectors.noise_norm import NoiseNorm

    det = NoiseNorm(steps=[0], n_generations=1, num_inference_steps=steps, guidance_scale=guidance)
    return float(np.mean(det.score_conditioning(pipe, cond, list(prompt_ids), seed=seed, resolution=resolution)))


def utility(
    pipe: StableDiffusionPipeline,
    extractor: Extractor,
    cond: torch.Tensor,
    prompt_ids: Sequence[int] | np.ndarray,
    real_images: torch.Tensor,
    *,
    n_per_prompt: int,
    seed: int,
    resolution: int,
    steps: int,
    guidance: float,
    batch_size: int = 32,
    clip: ClipExtractor | None = None,
    captions: Sequence[str] | None = None,
) -> dict:
    """Fréchet distance of ``n_per_prompt`` generations per prompt to ``real_images`` in the
    descriptor's space, the generations' diversity (mean pairwise cosine within a prompt) and,
    with a CLIP extractor ``clip`` and the prompts' ``captions``, their CLIPScore (alignment)."""
    ids = np.repeat(np.asarray(prompt_ids), n_per_prompt)
    rep = torch.as_tensor(np.repeat(np.arange(len(prompt_ids)), n_per_prompt))
    seeds = [sample_seed(seed, int(p), k) for p, k in zip(ids, np.tile(np.arange(n_per_prompt), len(prompt_ids)))]
    images = sample_images(
        pipe, cond[rep], seeds, resolution=resolution, steps=steps, guidance=guidance, batch_size=batch_size
    )
    with torch.no_grad():
        fake = extractor(images.float()).double().cpu().numpy()
        real = extractor(real_images.float()).double().cpu().numpy()
    out = {"fd": frechet_distance(fake, real), "n_generated": len(fake), "n_real": len(real)}
    if n_per_prompt > 1:
        normed = fake / np.maximum(np.linalg.norm(fake, axis=1, keepdims=True), 1e-12)
        out["diversity"] = diversity(normed, ids)
    if clip is not None:
        with torch.no_grad():
            img = clip(images.float()).double().cpu().numpy()
        txt = clip.embed_text(np.repeat(np.asarray(captions, dtype=object), n_per_prompt)).double().cpu().numpy()
        out["clip_score"] = clip_score(img, txt)
    return out


def real_rows(
    manifest: pd.DataFrame, split: str, n: int, seed: int, kinds: Iterable[str] | None = None
) -> pd.DataFrame:
    """``n`` random images (one row per file, with its caption) of ``split`` (and ``kinds``)."""
    from diffmem.errors import DataError

    rows = manifest[manifest["split"] == split] if "split" in manifest else manifest.iloc[:0]
    if kinds is not None and "kind" in rows:
        rows = rows[rows["kind"].isin(list(kinds))]
    rows = rows.drop_duplicates("file")
    if len(rows) < 2:
        raise DataError(
            f"utility: the dataset has {len(rows)} images with split '{split}'"
            + (f" and kind in {list(kinds)}" if kinds is not None else "")
            + "; need >= 2"
        )
    return rows.sample(min(int(n), len(rows)), random_state=int(seed)).reset_index(drop=True)
