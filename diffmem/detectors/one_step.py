"""Webster (2023) whitebox attack: how far one denoising step moves pure noise.

From each seeded noise ``x_T`` one guided denoising step at the first timestep ``t`` predicts
``x_0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)`` (``a_t`` = the scheduler's cumulative alpha,
``x_t`` = the scaled model input, i.e. ``x_T`` for DDIM/DDPM). The raw value is
``MSE(x_t, x_0)`` over the latent, averaged over ``n_seeds`` seeds.

**Sign convention** (every detector reports higher = more memorised): with the default
``higher_mse_is_memorised: true`` the score is ``+MSE``. A memorised prompt makes the model
predict one sharp training image whatever the noise, i.e. a large conditional noise deviation
(Wen et al.'s signal), which shows up as a high-energy ``x_0`` far from ``x_T``; a generic
prompt predicts a blurry mean closer to the noise. Set ``higher_mse_is_memorised: false``
to report ``-MSE`` instead (low MSE = memorised), e.g. to follow a reference implementation
that uses that orientation. ``metrics.json`` records which one was used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from diffmem.checks import check_float, check_int
from diffmem.detectors.base import Detector, to_epsilon, uncond_embedding
from diffmem.errors import ConfigError
from diffmem.sampling import fresh_scheduler, guided_eps, initial_latents

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline


def one_step_mse(
    pipe: StableDiffusionPipeline,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    seeds: Sequence[int],
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """``MSE(x_t, x_0-prediction)`` after one guided step at the first timestep: ``[B]``."""
    sched = fresh_scheduler(pipe, num_inference_steps)
    t = sched.timesteps[0]
    alphas = getattr(sched, "alphas_cumprod", None)
    if alphas is None:
        raise ConfigError(f"one_step: scheduler {type(sched).__name__} has no alphas_cumprod")
    x = initial_latents(pipe, seeds, resolution) * sched.init_noise_sigma
    xin = sched.scale_model_input(x, t)
    if uncond is not None and uncond.shape[0] == 1:
        uncond = uncond.expand(cond.shape[0], -1, -1)
    eps = to_epsilon(sched, guided_eps(pipe.unet, xin, t, cond, uncond, guidance_scale), xin, t).float()
    a = alphas[int(t)].to(xin.device, torch.float32)
    x0 = (xin.float() - (1 - a).sqrt() * eps) / a.sqrt()
    return (x0 - xin.float()).pow(2).flatten(1).mean(dim=1)


class OneStep(Detector):
    """Webster's one-step whitebox score (``+MSE`` by default; see the module docstring)."""

    name = "one_step"

    def __init__(
        self,
        n_seeds: int = 4,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        higher_mse_is_memorised: bool = True,
    ) -> None:
        self.n_seeds = check_int(n_seeds, "detect.n_seeds", 1)
        self.num_inference_steps = check_int(num_inference_steps, "detect.num_inference_steps", 1)
        self.guidance_scale = check_float(guidance_scale, "detect.guidance_scale", 0.0)
        if not isinstance(higher_mse_is_memorised, bool):
            raise ConfigError(f"detect.higher_mse_is_memorised must be true or false (got {higher_mse_is_memorised!r})")
        self.higher_mse_is_memorised = higher_mse_is_memorised

    @property
    def per_prompt(self) -> int:
        return self.n_seeds

    @property
    def sign(self) -> float:
        return 1.0 if self.higher_mse_is_memorised else -1.0

    def score_rows(
        self, pipe: StableDiffusionPipeline, cond: torch.Tensor, seeds: list[int], resolution: int
    ) -> torch.Tensor:
        uncond = uncond_embedding(self, pipe) if self.guidance_scale != 1.0 else None
        return self.sign * one_step_mse(
            pipe, cond, uncond, seeds, resolution, self.num_inference_steps, self.guidance_scale
        )
