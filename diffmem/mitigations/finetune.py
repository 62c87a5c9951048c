"""The fine-tuning harness shared by MemControl, its baselines and the training-time mitigations.

One loop (:func:`finetune`, on :func:`diffmem.training.fit`, so it resumes exactly) with:

- ``method: full`` (every UNet weight) or ``lora`` (peft LoRA adapters through diffusers'
  adapter API on the attention projections of the chosen transformer blocks);
- ``mask``: which transformer blocks adapt, named by their module path in the UNet
  (``down_blocks.1.attentions.0``), as MemControl's genes; null = all;
- caption augmentation (``augment``: MC/RC/RT/CWR with probability ``p``) and Gaussian noise
  on the text embedding (``gni``), Somepalli et al.'s training-time mitigations;
- ``noise_filter``: Wen et al.'s training-time mitigation, dropping from the loss every sample
  whose text-conditional noise norm ``||eps(x_t, c) - eps(x_t, c0)||`` is at least ``tau``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffmem.checks import check_positive, did_you_mean
from diffmem.errors import ConfigError
from diffmem.models.adapters import fuse_lora

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

METHODS = ("full", "lora")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def transformer_blocks(unet: UNet2DConditionModel) -> list[str]:
    """Module paths of the UNet's transformer blocks (SD v1: 16; the testbed: 4), in order."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [name for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)]


def flatten_mask(mask: Mapping[str, Any]) -> dict[str, int]:
    """``{block path: 0/1}`` from a flat or nested mapping (Hydra overrides such as
    ``mitigation.mask.down_blocks.1.attentions.0=1`` nest at every dot)."""
    out: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = int(node)

    walk(dict(mask), "")
    return out


def selected_blocks(unet: UNet2DConditionModel, mask: Mapping[str, Any] | None) -> list[str]:
    """The blocks ``mask`` switches on (every block when ``mask`` is None); unknown paths are
    an error with close matches."""
    blocks = transformer_blocks(unet)
    if mask is None:
        return blocks
    flat = flatten_mask(mask)
    for key, value in flat.items():
        if key not in blocks:
            hint = did_you_mean(key, blocks, n=2, cutoff=0.6)
            raise ConfigError(
                f"mitigation.mask: '{key}' is not a transformer block of this UNet.{hint} Blocks: {', '.join(blocks)}"
            )
        if value not in (0, 1):
            raise ConfigError(f"mitigation.mask.{key} must be 0 or 1 (got {value})")
    return [b for b in blocks if flat.get(b, 0) == 1]


def lora_targets(unet: UNet2DConditionModel, blocks: Iterable[str]) -> list[str]:
    """Full module names of the attention projections (self and cross) inside ``blocks``."""
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    return [
        n
        for n in names
        if any(n.startswith(b + ".") for b in blocks) and ".attn" in n and n.endswith(ATTENTION_PROJECTIONS)
    ]


def prepare(
    unet: UNet2DConditionModel, method: str, blocks: list[str], rank: int = 4, alpha: float | None = None
) -> int:
    """Make the chosen parameters trainable (LoRA adapters added for ``lora``; ``full`` runs the
    UNet in fp32, as diffusers' full fine-tuning does, under autocast to the pipeline's precision); returns their count
    (0 when ``blocks`` is empty: a MemControl mask of all zeros leaves the model as it is)."""
    if method not in METHODS:
        raise ConfigError(f"mitigation.method '{method}' is not one of {', '.join(METHODS)}")
    unet.requires_grad_(False)
    if method == "full":
        unet.to(torch.float32)  # type: ignore[arg-type]  # diffusers' wrapped ModelMixin.to drops the dtype overload; fp32 master weights for the whole UNet, as diffusers' full fine-tuning
        if len(blocks) == len(transformer_blocks(unet)):
            unet.requires_grad_(True)
        else:
            for b in blocks:
                unet.get_submodule(b).requires_grad_(True)
    elif blocks:
        from peft import LoraConfig

        check_positive(rank, "mitigation.rank")
        unet.add_adapter(
            LoraConfig(
                r=int(rank),
                lora_alpha=float(alpha or rank),  # type: ignore[arg-type]  # peft annotates int; a float alpha works (alpha / r)
                init_lora_weights=True,
                target_modules=lora_targets(unet, blocks),
            )
        )
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def merge(unet: UNet2DConditionModel, method: str) -> None:
    """Fold LoRA adapters into the weights (a plain diffusers UNet again)."""
    if method == "lora":
        fuse_lora(unet)
    unet.requires_grad_(False)


def noise_norms(
    unet: UNet2DConditionModel, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``||eps(x_t, t, c) - eps(x_t, t, c0)||`` (no gradient)."""
    with torch.no_grad():
        u = uncond.expand(xt.shape[0], -1, -1)
        e_u, e_c = unet(
            torch.cat([xt, xt]), torch.cat([t, t]), encoder_hidden_states=torch.cat([u, cond])
        ).sample.chunk(2)
    return (e_c - e_u).float().flatten(1).norm(dim=1)


def finetune(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    captions: list[str],
    s: DictConfig,
    *,
    seed: int,
    ckpt_dir: Path,
    tau: float | None = None,
) -> list[dict]:
    """Fine-tune ``pipe.unet`` (already :func:`prepare`-d) on (latent, caption) rows per ``s``.

    Each step draws ``s.batch_size`` rows, applies the caption augmentation, encodes the
    captions with the frozen text encoder, adds GNI noise, drops captions with probability
    ``s.caption_dropout``, and (with ``tau``) leaves out of the loss the samples whose noise
    norm is >= ``tau``. Returns the loss log (``kept`` = share of samples in the loss).
    """
    from diffusers import DDPMScheduler

    from diffmem import distributed
    from diffmem.mitigations.captions import augmenter, word_pool
    from diffmem.sampling import encode_prompts
    from diffmem.training import fit, fit_settings, mixed_precision, noised, prepare_trainables

    unet, n = pipe.unet, latents.shape[0]
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    uncond = encode_prompts(pipe, [""])
    aug = s.get("augment")
    augment = augmenter(aug.kind, aug.p, word_pool(pipe.tokenizer), int(aug.get("n_words", 2))) if aug else None
    gni = s.get("gni")
    kept: list[float] = []

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (int(s.batch_size),), generator=g)
        caps = [captions[i] for i in idx.tolist()]
        if augment is not None:
            caps = augment(caps, np.random.default_rng(int(torch.randint(2**62, (1,), generator=g))))
        cond = encode_prompts(pipe, caps).to(unet.device)
        if gni:
            hit = (torch.rand(len(caps), generator=g) < float(gni.p)).view(-1, 1, 1)
            cond = cond + float(gni.lam) * torch.randn(cond.shape, generator=g).to(cond.device) * hit.to(cond.device)
        drop = torch.rand(len(caps), generator=g) < float(s.caption_dropout)
        cond[drop.to(unet.device)] = uncond
        xt, t, target = noised(noise_sched, latents[idx].to(unet.device, unet.dtype), g)
        rows = distributed.batch_rows(len(idx))  # this rank's rows of the batch (all in one process)
        xt, t, target, cond = xt[rows], t[rows], target[rows], cond[rows]
        per = ((unet(xt, t, encoder_hidden_states=cond).sample.float() - target.float()) ** 2).flatten(1).mean(1)
        if tau is None:
            return distributed.batch_mean(per)
        keep = (noise_norms(unet, xt, t, cond, uncond) < tau) | drop[rows].to(unet.device)
        kept.append(float(keep.float().mean()))
        return distributed.batch_mean(per, keep)

    mixed = mixed_precision(pipe.text_encoder.dtype)  # the pipeline's precision (the text encoder stays frozen)
    prepare_trainables(unet, bool(s.get("gradient_checkpointing", False)))
    losses = fit(unet, loss_fn, seed=seed, phase="finetune", ckpt_dir=ckpt_dir, grad_clip=1.0, **fit_settings(s, mixed))
    unet.to(pipe.text_encoder.dtype)  # back to the pipeline's precision for inference
    if kept:
        log.info("noise filter kept %.1f %% of samples in this session's steps", 100 * np.mean(kept))
    return losses


def calibrate_tau(
    pipe: StableDiffusionPipeline, latents: torch.Tensor, captions: list[str], quantile: float, n: int, seed: int
) -> float:
    """Wen's threshold from the model before fine-tuning: the ``quantile`` of the noise norms of
    ``n`` random training samples (fresh noise and timesteps), so outliers are what gets dropped."""
    from diffusers import DDPMScheduler

    from diffmem.sampling import encode_prompts
    from diffmem.training import noised

    if not 0 < float(quantile) < 1:
        raise ConfigError(f"mitigation.noise_filter.quantile must be in (0, 1) (got {quantile})")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(latents.shape[0], (int(n),), generator=g)
    unet = pipe.unet
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    uncond = encode_prompts(pipe, [""])
    norms = []
    for chunk in idx.split(64):
        cond = encode_prompts(pipe, [captions[i] for i in chunk.tolist()]).to(unet.device)
        xt, t, _ = noised(noise_sched, latents[chunk].to(unet.device, unet.dtype), g)
        norms.append(noise_norms(unet, xt, t, cond, uncond))
    return float(torch.cat(norms).quantile(float(quantile)))
