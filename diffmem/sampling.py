"""The sampling loop shared by generation, training-time evaluation and the detectors.

Written out (rather than calling the pipeline) so that every sample has its own seed
(results do not depend on batch size) and other stages can reuse its pieces.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch


def sample_seed(base_seed: int, prompt_id: int, k: int) -> int:
    """The seed of generation ``k`` of prompt ``prompt_id``: independent of batching/sharding."""
    return int(np.random.SeedSequence([int(base_seed), int(prompt_id), int(k)]).generate_state(1)[0])


@torch.no_grad()
def encode_prompts(pipe, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Text-encoder outputs [N, 77, D] (the conditioning ``c``; ``""`` gives ``c0``).

    A defended pipeline (:mod:`diffmem.mitigations.defences`) first rewrites the captions.
    """
    device = pipe.text_encoder.device
    defence = getattr(pipe, "diffmem_defence", None)
    if defence is not None:
        captions = defence.text(captions, pipe)
    out = []
    for i in range(0, len(captions), batch_size):
        ids = pipe.tokenizer(list(captions[i:i + batch_size]), padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        out.append(pipe.text_encoder(ids)[0])
    return torch.cat(out)


def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return (pipe.unet.config.in_channels, resolution // factor, resolution // factor)


def initial_latents(pipe, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """x_T for each seed, drawn on the CPU so the same seed gives the same noise anywhere."""
    shape = latent_shape(pipe, resolution)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(pipe.unet.device, pipe.unet.dtype)


def fresh_scheduler(pipe, steps: int):
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, device=pipe.unet.device)
    return sched


def guided_eps(unet, x, t, cond, uncond, guidance: float) -> torch.Tensor:
    """Classifier-free-guided noise prediction (a single batch when guidance > 1)."""
    if guidance == 1.0 or uncond is None:
        return unet(x, t, encoder_hidden_states=cond).sample
    eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images [B, 3, H, W] in [0, 1]."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample(pipe, cond: torch.Tensor, seeds: Sequence[int], resolution: int, steps: int,
           guidance: float, uncond: torch.Tensor | None = None) -> torch.Tensor:
    """Generate one image per (conditioning row, seed): [B, 3, H, W] in [0, 1].

    ``uncond`` defaults to the empty prompt's conditioning.
    """
    for x in denoise(pipe, cond, seeds, resolution, steps, guidance, uncond):
        pass
    return decode(pipe, x)


def denoise(pipe, cond: torch.Tensor, seeds: Sequence[int], resolution: int, steps: int,
            guidance: float, uncond: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """The guided sampler one step at a time: yields the latents after each step.

    Stop early by leaving the loop (Wanda only needs the first steps). ``uncond`` defaults to
    the empty prompt's conditioning. A defended pipeline changes ``cond`` first, per seed.
    """
    defence = getattr(pipe, "diffmem_defence", None)
    if defence is not None:
        cond = defence.embedding(pipe, cond, seeds, resolution=resolution, steps=steps, guidance=guidance)
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
