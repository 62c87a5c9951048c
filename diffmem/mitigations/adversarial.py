"""Adversarial fine-tuning (Finding Dori, docs/methods.md section 5.1).

Full-UNet fine-tuning. Every ``refresh_every`` steps fresh triggers are searched for each
memorised image (the probe's trigger search, against the current weights); each step's loss is
the ordinary diffusion loss on non-memorised pairs (utility) plus ``adv_weight`` times the
diffusion loss that pairs each trigger, and the original prompt, with a *surrogate* image: one
the Wanda-pruned model generates for that prompt and that does not replicate it. The trigger
sets are stored per refresh (``triggers/refresh-<r>.safetensors``), so a killed run resumes exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from diffmem.probes import wanda as wanda_lib
from diffmem.probes.replication import sample_images, similarity_to_targets
from diffmem.probes.trigger import (
    TRIGGER_DIR,
    image_latents,
    initial_embedding,
    load_triggers,
    save_triggers,
    search_trigger,
    trigger_file,
    trigger_seed,
)
from diffmem.runs import resumed
from diffmem.sampling import encode_prompts, sample_seed
from diffmem.training import diffusion_loss, fit, fit_settings, mixed_precision, prepare_trainables

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from omegaconf import DictConfig

    from diffmem.features.base import Extractor

log = logging.getLogger(__name__)


def surrogates(
    pipe: StableDiffusionPipeline,
    extractor: Extractor,
    cond: torch.Tensor,
    images: torch.Tensor,
    prompt_ids: Sequence[int],
    s: DictConfig,
    *,
    seed: int,
    resolution: int,
    steps: int,
    guidance: float,
    threshold: float,
) -> tuple[torch.Tensor, pd.DataFrame]:
    """Per memorised prompt, the least similar of ``s.n_candidates`` generations of the
    Wanda-pruned model (masks from these prompts, ``s.fraction`` per row over ``s.n_steps``).

    Returns the surrogate images ``[T, 3, H, W]`` and a table of their similarity to the
    training image (``replicates`` flags a surrogate still above the threshold).
    """
    masks = wanda_lib.prompt_masks(
        pipe,
        cond,
        prompt_ids,
        seed=seed,
        n_seeds=1,
        resolution=resolution,
        steps=steps,
        guidance=guidance,
        n_steps=int(s.n_steps),
        fraction=float(s.fraction),
    )
    k = int(s.n_candidates)
    rep = torch.as_tensor(np.repeat(np.arange(len(cond)), k))
    seeds = [sample_seed(seed, int(p), 1000 + j) for p in prompt_ids for j in range(k)]
    with wanda_lib.pruned(pipe.unet, masks):
        cands = sample_images(pipe, cond[rep], seeds, resolution=resolution, steps=steps, guidance=guidance)
    sims = similarity_to_targets(extractor, cands, images[rep]).reshape(len(cond), k)
    best = sims.argmin(1)
    chosen = cands[torch.as_tensor(np.arange(len(cond)) * k + best)]
    table = pd.DataFrame(
        {"prompt_id": list(prompt_ids), "candidate": best, "similarity": sims.min(1), "best_candidate_max": sims.max(1)}
    )
    table["replicates"] = table["similarity"] > threshold
    if table["replicates"].any():
        log.warning(
            "adversarial_ft: %d surrogate(s) still replicate their training image", int(table["replicates"].sum())
        )
    return chosen, table


def _trigger_set(
    pipe: StableDiffusionPipeline,
    x0: torch.Tensor,
    cond: torch.Tensor,
    other: torch.Tensor,
    ts: DictConfig,
    refresh: int,
    seed: int,
    path: Path,
) -> torch.Tensor:
    """The triggers of one refresh (one per memorised image), stored at ``path``."""

    def make() -> None:
        inits, out = list(ts.inits), []
        for i in range(len(cond)):
            g = torch.Generator().manual_seed(trigger_seed(seed, i, refresh))
            start = initial_embedding(inits[(refresh + i) % len(inits)], cond[i], other[(refresh + i) % len(other)], g)
            emb, _ = search_trigger(
                pipe,
                x0[i : i + 1],
                start,
                steps=int(ts.steps),
                lr=float(ts.lr),
                batch_size=int(ts.batch_size),
                seed=trigger_seed(seed, i, refresh) + 1,
            )
            out.append(emb)
        save_triggers(path, torch.stack(out))

    return resumed(path, load_triggers, make)


def refreshes(run_dir: Path) -> int:
    """How many trigger sets :func:`adversarial_finetune` has stored under ``run_dir``."""
    return len(list((Path(run_dir) / TRIGGER_DIR).glob("refresh-*.safetensors")))


def adversarial_finetune(
    pipe: StableDiffusionPipeline,
    util_latents: torch.Tensor,
    util_cond: torch.Tensor,
    target_images: torch.Tensor,
    target_cond: torch.Tensor,
    surrogate_images: torch.Tensor,
    other_cond: torch.Tensor,
    s: DictConfig,
    *,
    seed: int,
    ckpt_dir: Path,
    run_dir: Path,
) -> list[dict]:
    """Fine-tune ``pipe.unet`` per ``s`` (see the module docstring; trigger sets stored under
    ``run_dir``); returns the loss log."""
    from diffusers import DDPMScheduler

    unet = pipe.unet
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    uncond = encode_prompts(pipe, [""])
    x0 = image_latents(pipe, target_images)
    x_sur = image_latents(pipe, surrogate_images)
    n = util_latents.shape[0]
    cache: dict[int, torch.Tensor] = {}

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        r = step // int(s.refresh_every)
        if r not in cache:
            cache.clear()
            cache[r] = _trigger_set(
                pipe, x0, target_cond, other_cond, s.trigger, r, seed, trigger_file(run_dir, f"refresh-{r:05d}")
            )
        idx = torch.randint(n, (int(s.batch_size),), generator=g)
        c = util_cond[idx].to(unet.device)
        drop = torch.rand(len(idx), generator=g) < float(s.caption_dropout)
        c[drop.to(unet.device)] = uncond.to(c.dtype)  # the text encoder's dtype (bf16/fp16) into fp32 rows
        loss_u = diffusion_loss(unet, noise_sched, util_latents[idx].to(unet.device), c, g, split=True)
        c_adv = torch.cat([cache[r], target_cond]).to(unet.device, unet.dtype)
        loss_a = diffusion_loss(unet, noise_sched, torch.cat([x_sur, x_sur]).to(unet.device), c_adv, g, split=True)
        return loss_u + float(s.adv_weight) * loss_a

    mixed = mixed_precision(pipe.text_encoder.dtype)  # the pipeline's precision (the text encoder stays frozen)
    unet.requires_grad_(True)
    prepare_trainables(unet, bool(s.get("gradient_checkpointing", False)))
    losses = fit(unet, loss_fn, seed=seed, phase="adversarial_ft", ckpt_dir=ckpt_dir, **fit_settings(s, mixed))
    unet.requires_grad_(False).to(pipe.text_encoder.dtype)  # back to the pipeline's precision for inference
    return losses
