"""Chen et al. (ICLR 2025): the "bright ending" of cross-attention marks memorised regions.

"Exploring Local Memorization in Diffusion Models via Bright Ending Attention" observes that,
at the last sampling step, image patches copied from a training image attend much more to
the prompt's end token than other patches. The end-token attention map ``m`` of the final
step (conditional branch, averaged over heads and over every cross-attention layer after a
bilinear resize to the latent grid) is their memorisation mask, and their detector is Wen et
al.'s magnitude restricted to it: per scored step ``|| (eps(x_t, c) - eps(x_t, c0)) * m ||_2``
(``m`` broadcast over latent channels), averaged over ``steps`` and ``n_generations`` seeds.

``m`` is scaled to mean 1 per sample, so a flat map gives exactly ``noise_norm``'s score at
the same steps. ``signal: end_attention`` scores the mask alone instead: the mean end-token
attention over the latent at the last step. Either way the whole guided sampler runs (the
mask needs its last step): about ``2 * num_inference_steps`` UNet evaluations per generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from diffmem.checks import check_float, check_int
from diffmem.detectors.attention import cross_attention, token_map
from diffmem.detectors.base import Detector, check_steps, guided_steps, to_epsilon, uncond_embedding
from diffmem.errors import ConfigError
from diffmem.sampling import latent_shape

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

SIGNALS = ("masked_norm", "end_attention")


class BrightEnding(Detector):
    """Chen et al.'s bright-ending detector (see the module docstring)."""

    name = "bright_ending"
    needs_token_counts = True

    def __init__(
        self,
        steps: Sequence[int] | str = (0,),
        signal: str = "masked_norm",
        n_generations: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
    ) -> None:
        self.num_inference_steps = check_int(num_inference_steps, "detect.num_inference_steps", 1)
        self.steps = check_steps(steps, self.num_inference_steps)
        if signal not in SIGNALS:
            raise ConfigError(f"detect.signal '{signal}' is not one of {', '.join(SIGNALS)}")
        self.signal = signal
        self.n_generations = check_int(n_generations, "detect.n_generations", 1)
        self.guidance_scale = check_float(guidance_scale, "detect.guidance_scale", 0.0)

    def score_rows(  # type: ignore[override]  # takes the token counts it asks for
        self,
        pipe: StableDiffusionPipeline,
        cond: torch.Tensor,
        seeds: list[int],
        resolution: int,
        n_tokens: Sequence[int],
    ) -> torch.Tensor:
        b, last = cond.shape[0], self.num_inference_steps - 1
        end = torch.as_tensor(n_tokens) - 1  # the EOS token follows the caption's tokens
        size = latent_shape(pipe, resolution)[1:]
        maps: dict[str, torch.Tensor] = {}
        diffs = {}

        def sink(name: str, probs: torch.Tensor) -> None:
            """Keep only the latest step's end-token maps (the last one is used)."""
            maps[name] = token_map(probs[-b:], end, size)

        with cross_attention(pipe.unet, sink):
            scored_last = self.signal == "masked_norm" and last in self.steps
            for i, t, xin, eps_u, eps_c in guided_steps(
                pipe,
                cond,
                uncond_embedding(self, pipe),
                seeds,
                resolution,
                self.num_inference_steps,
                self.guidance_scale,
                last=last,
                uncond_at_last=scored_last,
            ):
                if i in self.steps and self.signal == "masked_norm":
                    assert eps_u is not None  # a scored step has its unconditional output
                    diffs[i] = (
                        to_epsilon(pipe.scheduler, eps_c, xin, t) - to_epsilon(pipe.scheduler, eps_u, xin, t)
                    ).float()
        mask = torch.stack(list(maps.values())).mean(dim=0)  # [B, h, w], the last step's
        if self.signal == "end_attention":
            return mask.flatten(1).mean(dim=1, keepdim=True)
        mask = (mask / mask.flatten(1).mean(dim=1).clamp_min(1e-12)[:, None, None])[:, None]
        return torch.stack([(diffs[s] * mask).flatten(1).norm(dim=1) for s in self.steps], dim=1)
