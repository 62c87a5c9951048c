"""Embedding-space trigger search (Finding Dori, docs/methods.md section 4.1).

Optimises the text conditioning ``c_adv`` (the text-encoder output, ``[77, D]``) so the model
regenerates one target training image ``x0``: Adam on the diffusion loss
``|| eps - eps(x_t, t, c_adv) ||^2`` with fresh noise and timesteps every step (the training
loss, :func:`diffmem.training.diffusion_loss`). No norm bound; the distance travelled from the
initial embedding is measured afterwards. Initialisations: the prompt's own embedding
(``prompt``), a Gaussian with the prompt embedding's mean and std (``random``), or a
non-memorised prompt's embedding (``other``). Searched triggers are stored under a run dir's
``triggers/`` (:func:`trigger_file`, :func:`save_triggers`, :func:`load_triggers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffmem import distributed
from diffmem.checks import check_positive
from diffmem.errors import ConfigError, DataError
from diffmem.runs import atomic_path
from diffmem.sampling import sample_seed

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

INITS = ("prompt", "random", "other")
TRIGGER_DIR = "triggers"  # the run-dir folder of stored triggers (and the probes' generations from them)


@dataclass
class Trigger:
    """One searched trigger: the embedding, where it started and how the loss went."""

    embedding: torch.Tensor  # [tokens, D], float32, on the CPU
    init: str
    losses: list[float]
    distance: float  # L2 distance from the initial embedding


def trigger_file(run_dir: str | Path, key: str) -> Path:
    """Where the triggers stored under ``key`` live: ``<run_dir>/triggers/<key>.safetensors``."""
    return Path(run_dir) / TRIGGER_DIR / f"{key}.safetensors"


def save_triggers(path: str | Path, triggers: torch.Tensor) -> Path:
    """Store a stack of triggers ``[N, tokens, D]`` (safetensors, atomically)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"triggers": triggers.contiguous()}, str(tmp))
    return Path(path)


def load_triggers(path: str | Path) -> torch.Tensor:
    """The triggers :func:`save_triggers` stored at ``path``."""
    from safetensors.torch import load_file

    return load_file(str(path))["triggers"]


def trigger_seed(seed: int, prompt_id: int, restart: int) -> int:
    """The seed of restart ``restart`` for prompt ``prompt_id`` (independent of the other targets)."""
    return sample_seed(seed, prompt_id, 1_000_000 + int(restart))


def image_latents(pipe: StableDiffusionPipeline, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Scaled VAE latents (posterior mean; float32, CPU) of ``[B, 3, H, W]`` images in [0, 1],
    ``batch_size`` at a time."""
    from diffmem.training import encode_latents

    return encode_latents(pipe.vae, (b * 2 - 1 for b in images.split(batch_size)))


def initial_embedding(
    init: str, prompt_cond: torch.Tensor, other_cond: torch.Tensor | None, g: torch.Generator
) -> torch.Tensor:
    """The starting point of a search (``[tokens, D]``)."""
    if init == "prompt":
        return prompt_cond.clone()
    if init == "random":
        noise = torch.randn(prompt_cond.shape, generator=g).to(prompt_cond.device, prompt_cond.dtype)
        return noise * prompt_cond.std() + prompt_cond.mean()
    if init == "other":
        if other_cond is None:
            raise ConfigError("init 'other' needs non-memorised prompts to start from")
        return other_cond.clone()
    raise ConfigError(f"unknown trigger init '{init}' (known: {', '.join(INITS)})")


def search_trigger(
    pipe: StableDiffusionPipeline,
    x0: torch.Tensor,
    init: torch.Tensor,
    *,
    steps: int = 50,
    lr: float = 0.1,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, list[float]]:
    """Adam on ``c_adv`` (from ``init``, ``[tokens, D]``) so ``pipe.unet`` denoises towards latent ``x0``.

    Each step draws ``batch_size`` (noise, timestep) pairs for the one target from a generator
    seeded with ``seed``. The UNet's weights are untouched (no gradients to them) and it runs
    in its own dtype; ``c_adv`` stays fp32 (a grad scaler guards fp16). Returns the trigger
    (float32, CPU) and the loss per step.
    """
    from diffusers import DDPMScheduler

    from diffmem.training import diffusion_loss

    check_positive(steps, "trigger search steps")
    check_positive(batch_size, "trigger search batch_size")
    if not lr > 0:
        raise ConfigError(f"trigger search needs lr > 0 (got {lr})")
    unet = pipe.unet
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    c_adv = init.detach().to(unet.device, torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([c_adv], lr=lr)
    scaler = torch.amp.GradScaler(unet.device.type, enabled=unet.dtype == torch.float16)  # fp16 gradients underflow
    g = torch.Generator().manual_seed(int(seed))
    target = x0.to(unet.device, unet.dtype).expand(batch_size, -1, -1, -1)
    losses = []
    frozen = [p for p in unet.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for _ in range(int(steps)):
            cond = c_adv.to(unet.dtype).unsqueeze(0).expand(batch_size, -1, -1)
            loss = diffusion_loss(unet, noise_sched, target, cond, g)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if not np.isfinite(losses).all():
        raise DataError("trigger search diverged (non-finite loss); lower probe.lr")
    return c_adv.detach().cpu(), losses


def search_triggers(
    pipe: StableDiffusionPipeline,
    x0: torch.Tensor,
    prompt_cond: torch.Tensor,
    *,
    prompt_id: int,
    restarts: int,
    inits: Sequence[str],
    other_conds: torch.Tensor | None = None,
    steps: int = 50,
    lr: float = 0.1,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Trigger]:
    """``restarts`` triggers for one target, cycling through ``inits``.

    Restart ``r`` uses init ``inits[r % len(inits)]``, the seed :func:`trigger_seed` and, for
    ``other``, the non-memorised embedding ``other_conds[r % len(other_conds)]``. The restarts
    are independent: the ranks of a split stage search a share of them each.
    """

    def search(rows: np.ndarray) -> list[Trigger]:
        out = []
        for r in map(int, rows):
            init = inits[r % len(inits)]
            g = torch.Generator().manual_seed(trigger_seed(seed, prompt_id, r))
            other = other_conds[r % len(other_conds)] if other_conds is not None and len(other_conds) else None
            start = initial_embedding(init, prompt_cond, other, g)
            emb, losses = search_trigger(
                pipe, x0, start, steps=steps, lr=lr, batch_size=batch_size, seed=trigger_seed(seed, prompt_id, r) + 1
            )
            out.append(Trigger(emb, init, losses, float((emb - start.cpu().float()).norm())))
        return out

    return distributed.deal(int(restarts), search)
