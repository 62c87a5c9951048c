"""Ren et al. (ECCV 2024): memorised prompts spread their cross-attention over the prompt tokens.

"Unveiling and Mitigating Memorization in Text-to-image Diffusion Models through Cross
Attention" observes that a non-memorised prompt's cross-attention piles up on the beginning
token, while a memorised one spreads over the (trigger) tokens: its attention has a higher
entropy, already at the first sampling step. The score (the paper's detection signal "E"):
at each of ``steps`` of the guided sampler, average the conditional branch's cross-attention
probabilities over heads, query pixels and the chosen ``layers`` into one distribution over
all tokens, take its Shannon entropy, and average over steps and ``n_generations`` seeds;
higher = memorised. At the default (first step, one generation) only the conditional UNet
pass of step 0 runs: 1 UNet evaluation per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from diffmem.checks import check_float, check_int
from diffmem.detectors.attention import cross_attention, entropy, token_distribution
from diffmem.detectors.base import Detector, check_steps, guided_steps, uncond_embedding
from diffmem.errors import ConfigError

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline


class AttentionEntropy(Detector):
    """Ren et al.'s cross-attention entropy. ``layers``: indices into the UNet's cross-attention
    layers in model order (None = all of them)."""

    name = "attention_entropy"

    def __init__(
        self,
        steps: Sequence[int] | str = (0,),
        layers: Sequence[int] | None = None,
        n_generations: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
    ) -> None:
        self.num_inference_steps = check_int(num_inference_steps, "detect.num_inference_steps", 1)
        self.steps = check_steps(steps, self.num_inference_steps)
        self.layers = None if layers is None else [check_int(i, "detect.layers", 0) for i in layers]
        if self.layers is not None and not self.layers:
            raise ConfigError("detect.layers must name at least one layer (or be null: all)")
        self.n_generations = check_int(n_generations, "detect.n_generations", 1)
        self.guidance_scale = check_float(guidance_scale, "detect.guidance_scale", 0.0)

    def score_rows(
        self, pipe: StableDiffusionPipeline, cond: torch.Tensor, seeds: list[int], resolution: int
    ) -> torch.Tensor:
        current: dict[str, torch.Tensor] = {}
        entropies = {}

        def sink(name: str, probs: torch.Tensor) -> None:
            current[name] = token_distribution(probs[-cond.shape[0] :])  # the conditional rows

        with cross_attention(pipe.unet, sink) as names:
            if self.layers is not None and max(self.layers) >= len(names):
                raise ConfigError(
                    f"detect.layers: the UNet has {len(names)} cross-attention layers "
                    f"(indices 0-{len(names) - 1}), not {max(self.layers) + 1}"
                )
            chosen = names if self.layers is None else [names[i] for i in self.layers]
            for i, *_ in guided_steps(
                pipe,
                cond,
                uncond_embedding(self, pipe),
                seeds,
                resolution,
                self.num_inference_steps,
                self.guidance_scale,
                last=self.steps[-1],
                uncond_at_last=False,
            ):
                if i in self.steps:
                    entropies[i] = entropy(torch.stack([current[n] for n in chosen]).mean(dim=0))
                current.clear()
        return torch.stack([entropies[s] for s in self.steps], dim=1)
