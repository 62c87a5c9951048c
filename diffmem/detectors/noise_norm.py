"""Wen et al. (ICLR 2024): the magnitude of the text-conditional noise prediction.

While sampling with classifier-free guidance from per-prompt seeded noise, step ``t`` gives
``d_t = || eps(x_t, t, c) - eps(x_t, t, c0) ||_2`` over the whole latent (``c0`` = the empty
prompt). A prompt's score is the mean (or max) of ``d_t`` over the chosen ``steps`` and
``n_generations`` seeds; memorised prompts give large values. The sampler runs only up to
the last scored step: the default (``steps=[0]``, one generation) costs one guided UNet call
pair (2 evaluations) per prompt.

Per-token attribution (Wen et al. section 4): the gradient of the score with respect to each
token's input embedding (the text encoder's token-embedding output), L2 norm per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from diffmem.checks import check_float, check_int
from diffmem.detectors.base import Detector, check_steps, guided_steps, to_epsilon, uncond_embedding
from diffmem.errors import ConfigError, DataError
from diffmem.sampling import sample_seed, vae_factor

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

REDUCTIONS = ("mean", "max")


def noise_norm_trajectory(
    pipe: StableDiffusionPipeline,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    seeds: Sequence[int],
    resolution: int,
    steps: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """``d_t`` for each conditioning row / seed and each of ``steps``: ``[B, len(steps)]``.

    Differentiable (call under ``torch.no_grad()`` when scoring). ``uncond`` is ``[1 or B, L, D]``.
    x_t follows the guided sampler (:func:`~diffmem.detectors.base.guided_steps`).
    """
    wanted, norms = set(int(s) for s in steps), {}
    for i, t, xin, eps_u, eps_c in guided_steps(
        pipe, cond, uncond, seeds, resolution, num_inference_steps, guidance_scale, last=max(wanted)
    ):
        if i in wanted:  # the same difference as the raw outputs for epsilon models
            assert eps_u is not None  # uncond_at_last: every step has it
            diff = to_epsilon(pipe.scheduler, eps_c, xin, t) - to_epsilon(pipe.scheduler, eps_u, xin, t)
            norms[i] = diff.float().flatten(1).norm(dim=1)
    return torch.stack([norms[int(s)] for s in steps], dim=1)


class NoiseNorm(Detector):
    """Wen et al.'s detector. ``steps``: sampling-step indices to score (0 = first), or ``"all"``."""

    name = "noise_norm"
    supports_attribution = True

    def __init__(
        self,
        steps: Sequence[int] | str = (0,),
        n_generations: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        reduction: str = "mean",
    ) -> None:
        self.num_inference_steps = check_int(num_inference_steps, "detect.num_inference_steps", 1)
        self.steps = check_steps(steps, self.num_inference_steps)
        self.n_generations = check_int(n_generations, "detect.n_generations", 1)
        self.guidance_scale = check_float(guidance_scale, "detect.guidance_scale", 0.0)
        if reduction not in REDUCTIONS:
            raise ConfigError(f"detect.reduction '{reduction}' is not one of {', '.join(REDUCTIONS)}")
        self.reduction = reduction

    def score_rows(
        self, pipe: StableDiffusionPipeline, cond: torch.Tensor, seeds: list[int], resolution: int
    ) -> torch.Tensor:
        return noise_norm_trajectory(
            pipe,
            cond,
            uncond_embedding(self, pipe),
            seeds,
            resolution,
            self.steps,
            self.num_inference_steps,
            self.guidance_scale,
        )

    def reduce(self, values: np.ndarray) -> np.ndarray:
        flat = values.reshape(values.shape[0], -1)
        return flat.max(axis=1) if self.reduction == "max" else flat.mean(axis=1)

    def attribute(
        self,
        pipe: StableDiffusionPipeline,
        caption: str,
        prompt_id: int = 0,
        *,
        seed: int = 0,
        resolution: int | None = None,
    ) -> pd.DataFrame:
        """``token_index, token, attribution``: one row per non-padding token (BOS/EOS included)."""
        tok = pipe.tokenizer(
            [str(caption)],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tok.input_ids.to(pipe.text_encoder.device)
        n_tokens = int(tok.attention_mask[0].sum())
        resolution = int(resolution or pipe.unet.config.sample_size * vae_factor(pipe))
        seeds = [sample_seed(seed, prompt_id, k) for k in range(self.n_generations)]
        uncond = uncond_embedding(self, pipe)
        captured = {}

        def hook(
            module: torch.nn.Module, args: Any, output: torch.Tensor
        ) -> torch.Tensor:  # make the token embeddings a leaf we can differentiate
            leaf = output.detach().requires_grad_(True)
            captured["emb"] = leaf
            return leaf

        handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(hook)
        try:
            with torch.enable_grad():
                cond = pipe.text_encoder(ids)[0]
                handle.remove()
                d = noise_norm_trajectory(
                    pipe,
                    cond.expand(len(seeds), -1, -1),
                    uncond,
                    seeds,
                    resolution,
                    self.steps,
                    self.num_inference_steps,
                    self.guidance_scale,
                )
                score = d.max() if self.reduction == "max" else d.mean()
                (grad,) = torch.autograd.grad(score, captured["emb"])
        finally:
            handle.remove()
        attribution = grad[0, :n_tokens].float().norm(dim=-1).cpu().numpy().astype(np.float64)
        if not np.isfinite(attribution).all():
            raise DataError(f"{self.name}: non-finite attribution for {caption!r}")
        tokens = pipe.tokenizer.convert_ids_to_tokens(ids[0, :n_tokens].tolist())
        return pd.DataFrame({"token_index": np.arange(n_tokens), "token": tokens, "attribution": attribution})
