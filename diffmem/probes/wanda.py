"""Wanda pruning against memorisation (Chavhan et al. 2024).

Layers: the second FFN linear (``ff.net.2``) of every transformer block
(:func:`~diffmem.probes.layers.ffn_layers`). At each of the first ``n_steps`` sampling steps
the score of weight ``W[i, j]`` is ``|W[i, j]| * ||X[:, j]||_2`` with ``X`` the layer's input
activations for the memorised prompt (all seeds and spatial tokens), and likewise for the
empty prompt at the same latents (the unconditional half of the guided batch). Per output
row, the ``fraction`` of weights with the highest memorised-prompt score, among those whose
score beats the empty prompt's, are selected; masks are united over the steps and the
weights zeroed permanently (:func:`prune`) or for a while (:func:`pruned`). Masks are stored
as ``masks.safetensors`` (:func:`save_masks`, :func:`load_masks`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffmem import distributed
from diffmem.checks import check_positive
from diffmem.errors import ConfigError
from diffmem.probes.layers import ffn_layers, get_layers, record
from diffmem.runs import atomic_path
from diffmem.sampling import denoise, encode_prompts

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

Masks = dict[str, torch.Tensor]
MASKS_FILE = "masks.safetensors"  # a run dir's stored masks


def row_topk_mask(score: torch.Tensor, baseline: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per output row, the top ``fraction`` (at least one) of ``score`` among entries with
    ``score > baseline``: a boolean mask shaped like ``score`` ``[out, in]``."""
    k = max(1, math.ceil(fraction * score.shape[1]))
    candidates = torch.where(score > baseline, score, torch.full_like(score, -math.inf))
    top = candidates.topk(k, dim=1)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, top.indices, torch.isfinite(top.values))
    return mask


@torch.no_grad()
def wanda_masks(
    pipe: StableDiffusionPipeline,
    cond: torch.Tensor,
    seeds: Sequence[int],
    *,
    resolution: int,
    steps: int,
    guidance: float,
    n_steps: int = 10,
    fraction: float = 0.01,
    layers: Sequence[str] | None = None,
) -> Masks:
    """Weights to prune for one conditioning (``[tokens, D]``), sampled from ``seeds``.

    Runs the guided sampler for the first ``n_steps`` steps while recording the inputs of
    ``layers`` (default: every ``ff.net.2``); returns ``{layer: bool [out, in]}``.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"wanda fraction must be in (0, 1] (got {fraction})")
    if guidance == 1.0:
        raise ConfigError("wanda compares with the empty prompt's half of the guided batch: needs guidance_scale != 1")
    if check_positive(n_steps, "wanda n_steps") > steps:
        raise ConfigError(f"wanda n_steps must be in [1, {steps}] (got {n_steps})")
    names = list(layers) if layers else list(ffn_layers(pipe.unet))
    modules = get_layers(pipe.unet, names)
    b = len(seeds)
    c = cond.to(pipe.unet.device, pipe.unet.dtype).unsqueeze(0).expand(b, -1, -1)
    uncond = encode_prompts(pipe, [""])
    masks = {n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in modules.items()}
    with record(pipe.unet, names, what="input", reduce=_half_norms) as norms:
        for i, _ in enumerate(denoise(pipe, c, seeds, resolution, steps, guidance, uncond)):
            if i + 1 >= n_steps:
                break
    for name, module in modules.items():
        w = module.weight.abs().float()
        for norm_u, norm_c in norms[name][:n_steps]:
            masks[name] |= row_topk_mask(w * norm_c, w * norm_u, fraction)
    return masks


def _half_norms(x: torch.Tensor) -> torch.Tensor:
    """``[2, in]``: the input-column L2 norms of the unconditional and the conditional half of a
    guided batch ``[2B, tokens, in]`` (unconditional rows first). Wanda keeps only these per
    step, never the activations."""
    return torch.stack([half.float().reshape(-1, x.shape[-1]).norm(dim=0) for half in x.chunk(2)])


def prompt_masks(
    pipe: StableDiffusionPipeline,
    conds: torch.Tensor,
    prompt_ids: Iterable[int],
    *,
    seed: int,
    n_seeds: int,
    resolution: int,
    steps: int,
    guidance: float,
    n_steps: int,
    fraction: float,
) -> Masks:
    """The union of :func:`wanda_masks` over several conditionings, each with the first
    ``n_seeds`` generation seeds of its prompt (``sample_seed(seed, prompt_id, k)``); the ranks
    of a split stage take a share of the conditionings each (a union in any order is the same)."""
    from diffmem.sampling import sample_seed

    prompt_ids = list(prompt_ids)

    def masks(idx: np.ndarray) -> list[Masks]:  # on the CPU (as load_masks gives them): ranks exchange them
        out = []
        for i in idx:
            m = wanda_masks(
                pipe,
                conds[i],
                [sample_seed(seed, int(prompt_ids[i]), k) for k in range(int(n_seeds))],
                resolution=resolution,
                steps=steps,
                guidance=guidance,
                n_steps=int(n_steps),
                fraction=float(fraction),
            )
            out.append({name: v.cpu() for name, v in m.items()})
        return out

    return union(distributed.deal(len(prompt_ids), masks))


def union(masks: Sequence[Masks]) -> Masks:
    """Element-wise OR of several prompts' masks."""
    out: Masks = {}
    for m in masks:
        for name, v in m.items():
            out[name] = out[name] | v if name in out else v.clone()
    return out


@torch.no_grad()
def prune(unet: UNet2DConditionModel, masks: Masks) -> int:
    """Zero the masked weights in place; returns how many were zeroed."""
    total = 0
    for name, module in get_layers(unet, list(masks)).items():
        mask = masks[name].to(module.weight.device)
        if mask.shape != module.weight.shape:
            raise ConfigError(f"{name}: mask {tuple(mask.shape)} does not fit weight {tuple(module.weight.shape)}")
        module.weight[mask] = 0
        total += int(mask.sum())
    return total


@contextlib.contextmanager
def pruned(unet: UNet2DConditionModel, masks: Masks) -> Iterator[None]:
    """The UNet with ``masks`` zeroed inside the block; the original weights come back afterwards."""
    layers = get_layers(unet, list(masks))
    saved = {k: m.weight.detach().clone() for k, m in layers.items()}
    try:
        prune(unet, masks)
        yield
    finally:
        with torch.no_grad():
            for k, m in layers.items():
                m.weight.copy_(saved[k])


def save_masks(path: str | Path, masks: Masks) -> Path:
    """Store ``masks`` (safetensors, one uint8 tensor per layer, atomically)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(tmp))
    return Path(path)


def load_masks(path: str | Path) -> Masks:
    """The masks :func:`save_masks` stored at ``path``."""
    from safetensors.torch import load_file

    return {k: v.bool() for k, v in load_file(str(path)).items()}


def mask_iou(a: Masks, b: Masks) -> float:
    """Intersection over union of two masks over all their layers (1.0 when both are empty)."""
    inter = sum(int((a[n] & b.get(n, torch.zeros_like(a[n]))).sum()) for n in a)
    uni = sum(int(v.sum()) for v in union([a, b]).values())
    return inter / uni if uni else 1.0
