"""The sampling loop shared by generation, training-time evaluation and the detectors.

Written out (rather than calling the pipeline) so that every sample has its own seed
(results do not depend on batch size) and other stages can reuse its pieces.

Sampler hooks (:class:`SamplerHooks`, like diffusers' step callbacks) let a pipeline change
its conditioning without changing its weights: set on a pipeline with :func:`set_hooks`, the
sampler applies ``text`` to the captions (:func:`encode_prompts`) and ``embedding`` to the
conditioning of each generation (:func:`denoise`). The inference-time defences
(:mod:`diffmem.mitigations.defences`) are such hooks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch

from diffmem.errors import ConfigError

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

log = logging.getLogger(__name__)

#: the pipeline attribute that holds its sampler hooks
HOOKS_ATTR = "diffmem_sampler_hooks"


class SamplerHooks(Protocol):
    """What the sampler asks of a pipeline's hooks (see the module docstring)."""

    name: str  # names the hooks in result tables (evaluate-mitigation's ``defence`` column)

    def text(self, captions: Sequence[str], pipe: StableDiffusionPipeline) -> list[str]:
        """The captions the text encoder sees instead of ``captions``."""

    def embedding(
        self,
        pipe: StableDiffusionPipeline,
        cond: torch.Tensor,
        seeds: Sequence[int],
        *,
        resolution: int,
        steps: int,
        guidance: float,
    ) -> torch.Tensor:
        """The conditioning of generations ``seeds`` instead of ``cond`` (one row per seed)."""


def set_hooks(pipe: StableDiffusionPipeline, hooks: SamplerHooks) -> StableDiffusionPipeline:
    """Attach ``hooks`` to ``pipe``; returns ``pipe``."""
    setattr(pipe, HOOKS_ATTR, hooks)
    return pipe


def get_hooks(pipe: StableDiffusionPipeline) -> SamplerHooks | None:
    """The hooks attached to ``pipe`` (None for a plain pipeline)."""
    return getattr(pipe, HOOKS_ATTR, None)


def sample_seed(base_seed: int, prompt_id: int, k: int) -> int:
    """The seed of generation ``k`` of prompt ``prompt_id``: independent of batching/sharding."""
    return int(np.random.SeedSequence([int(base_seed), int(prompt_id), int(k)]).generate_state(1)[0])


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Text-encoder outputs [N, 77, D] (the conditioning ``c``; ``""`` gives ``c0``).

    A pipeline with hooks (:func:`set_hooks`) first rewrites the captions.
    """
    device = pipe.text_encoder.device
    hooks = get_hooks(pipe)
    if hooks is not None:
        captions = hooks.text(captions, pipe)
    out = []
    for i in range(0, len(captions), batch_size):
        ids = pipe.tokenizer(
            list(captions[i : i + batch_size]),
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        out.append(pipe.text_encoder(ids)[0])
    return torch.cat(out)


def token_counts(pipe: StableDiffusionPipeline, captions: Sequence[str]) -> list[int]:
    """Tokens per caption as :func:`encode_prompts` feeds them (BOS and EOS included, truncated)."""
    hooks = get_hooks(pipe)
    if hooks is not None:
        captions = hooks.text(captions, pipe)
    mask = pipe.tokenizer(
        list(captions),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).attention_mask
    return [int(n) for n in mask.sum(dim=1)]


def vae_factor(pipe: StableDiffusionPipeline) -> int:
    """How many pixels one latent is wide (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def check_resolution(pipe: StableDiffusionPipeline, resolution: int, name: str = "resolution") -> int:
    """``resolution`` if ``pipe`` makes images of that size (a multiple of its VAE's factor)."""
    factor = vae_factor(pipe)
    if int(resolution) % factor:
        raise ConfigError(
            f"{name}={resolution} is not a multiple of {factor}, the model's VAE downscale "
            f"factor (it would make {int(resolution) // factor * factor}-pixel images)"
        )
    return int(resolution)


def latent_shape(pipe: StableDiffusionPipeline, resolution: int) -> tuple[int, int, int]:
    size = check_resolution(pipe, resolution) // vae_factor(pipe)
    return (pipe.unet.config.in_channels, size, size)


def initial_latents(pipe: StableDiffusionPipeline, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """x_T for each seed, drawn on the CPU so the same seed gives the same noise anywhere."""
    shape = latent_shape(pipe, resolution)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(pipe.unet.device, pipe.unet.dtype)


def fresh_scheduler(pipe: StableDiffusionPipeline, steps: int) -> Any:
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, device=pipe.unet.device)
    return sched


def guided_eps(
    unet: UNet2DConditionModel,
    x: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """Classifier-free-guided noise prediction (a single batch when guidance > 1)."""
    if guidance == 1.0 or uncond is None:
        return unet(x, t, encoder_hidden_states=cond).sample
    eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def decode(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images [B, 3, H, W] in [0, 1]."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample(
    pipe: StableDiffusionPipeline,
    cond: torch.Tensor,
    seeds: Sequence[int],
    resolution: int,
    steps: int,
    guidance: float,
    uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate one image per (conditioning row, seed): [B, 3, H, W] in [0, 1].

    ``uncond`` defaults to the empty prompt's conditioning.
    """
    for x in denoise(pipe, cond, seeds, resolution, steps, guidance, uncond):  # noqa: B007 (x: the last step's latents)
        pass
    return decode(pipe, x)


def denoise(
    pipe: StableDiffusionPipeline,
    cond: torch.Tensor,
    seeds: Sequence[int],
    resolution: int,
    steps: int,
    guidance: float,
    uncond: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """The guided sampler one step at a time: yields the latents after each step.

    Stop early by leaving the loop (Wanda only needs the first steps). ``uncond`` defaults to
    the empty prompt's conditioning. A pipeline with hooks changes ``cond`` first, per seed.
    """
    hooks = get_hooks(pipe)
    if hooks is not None:
        cond = hooks.embedding(pipe, cond, seeds, resolution=resolution, steps=steps, guidance=guidance)
    if uncond is None and guidance != 1.0:
        uncond = encode_prompts(pipe, [""])
    if uncond is not None and uncond.shape[0] == 1:
        uncond = uncond.expand(cond.shape[0], -1, -1)
    sched = fresh_scheduler(pipe, steps)
    x = initial_latents(pipe, seeds, resolution) * sched.init_noise_sigma
    generators = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]  # for stochastic samplers
    kwargs = {"generator": generators} if "generator" in sched.step.__code__.co_varnames else {}
    for t in sched.timesteps:
        eps = guided_eps(pipe.unet, sched.scale_model_input(x, t), t, cond, uncond, guidance)
        x = sched.step(eps, t, x, **kwargs).prev_sample
        yield x


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    from diffmem.runs import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


#: a generation of this many images or more estimates its time after the first batch
LARGE_RUN = 10_000


def _duration(seconds: float) -> str:
    """``"2 h 05 min"``, ``"35 min"`` or ``"40 s"``."""
    minutes = int(round(seconds / 60))
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min" if minutes else f"{int(round(seconds))} s"


def generate_images(
    pipe: StableDiffusionPipeline,
    plan: pd.DataFrame,
    run_dir: Path,
    *,
    resolution: int,
    steps: int,
    guidance: float,
    batch_size: int,
    desc: str = "generate",
    shard: bool = False,
) -> None:
    """Generate every row of ``plan`` (:func:`diffmem.data.samples.plan_samples`) whose PNG does not exist yet.

    Batches are fixed slices of ``plan``, not of the missing rows: batched sampling may
    move a pixel level, so a resumed run samples each image in the same batch as an
    uninterrupted run would (identical PNGs). A batch with any PNG missing is sampled
    whole; only its missing PNGs are written. With ``shard``, this rank of a data-parallel
    job samples only its share of the batches (:func:`diffmem.distributed.shard_rows`).
    """
    from tqdm.auto import tqdm

    from diffmem.distributed import shard_rows

    missing = np.array([not (run_dir / f).exists() for f in plan["file"]], dtype=bool)
    ours = shard_rows(len(plan), batch_size)[::batch_size] if shard else range(0, len(plan), batch_size)
    starts = [s for s in ours if missing[s : s + batch_size].any()]
    if not starts:
        return
    uncond = encode_prompts(pipe, [""])
    started = time.monotonic()
    todo_total = sum(int(missing[s : s + batch_size].sum()) for s in starts)  # this rank's share
    with tqdm(total=todo_total, desc=desc, mininterval=2) as bar:  # closed on errors too
        for i, start in enumerate(starts):
            if i == 1 and bar.total >= LARGE_RUN:  # the first batch timed: the whole run estimated
                took = time.monotonic() - started
                log.warning(
                    "%s: %s images to make; the first batch took %.1f s, so about %s in all",
                    desc,
                    f"{bar.total:,}",
                    took,
                    _duration(took * len(starts)),
                )
            batch = plan.iloc[start : start + batch_size]
            todo = missing[start : start + batch_size]
            cond = encode_prompts(pipe, batch["caption"].tolist())
            images = to_uint8(sample(pipe, cond, batch["seed"].tolist(), resolution, steps, guidance, uncond=uncond))
            for file, image, new in zip(batch["file"], images, todo):
                if new:
                    _write_png(run_dir / file, image)
            bar.update(int(todo.sum()))
