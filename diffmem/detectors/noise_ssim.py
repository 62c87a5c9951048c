"""NeMo (Hintersdorf et al. 2024): consistency of the conditional noise prediction across seeds.

With guidance 0 (the conditional prediction alone) the sampler runs from ``n_seeds`` seeded
noises ``x_T`` to the early DDIM step ``step``, where the predicted noise gives the noise
difference ``eps(x_t, t, c) - x_T``. Each difference is min-max normalised per channel to
[0, 1] and every pair of seeds is compared with SSIM (skimage, ``data_range=1``, channels
averaged); the prompt's score is the mean over pairs. Memorised prompts push every seed
towards the same image, so their differences agree: high = memorised. NeMo flags prompts
above ``mean + 1 std`` of non-memorised prompts' scores (0.428 on SD v1.4): see
:func:`calibrate_threshold`.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffmem.checks import check_int
from diffmem.detectors.base import Detector, to_epsilon
from diffmem.errors import ConfigError, DataError
from diffmem.metrics.detection import calibrate_threshold
from diffmem.sampling import fresh_scheduler, guided_eps, initial_latents

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

__all__ = ["NoiseSSIM", "noise_differences", "minmax_per_channel", "mean_pairwise_ssim", "calibrate_threshold"]


def noise_differences(
    pipe: StableDiffusionPipeline,
    cond: torch.Tensor,
    seeds: Sequence[int],
    resolution: int,
    step: int,
    num_inference_steps: int,
) -> torch.Tensor:
    """``eps(x_t, t, c) - x_T`` at sampling step ``step`` of the conditional-only sampler.

    Returns ``[B, C, h, w]`` (float32), one row per conditioning row / seed.
    """
    sched = fresh_scheduler(pipe, num_inference_steps)
    x_T = initial_latents(pipe, seeds, resolution) * sched.init_noise_sigma
    x = x_T
    generators = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]
    kwargs = {"generator": generators} if "generator" in sched.step.__code__.co_varnames else {}
    for i, t in enumerate(sched.timesteps[: step + 1]):
        xin = sched.scale_model_input(x, t)
        eps = guided_eps(pipe.unet, xin, t, cond, None, 1.0)  # conditional only
        if i == step:
            return (to_epsilon(sched, eps, xin, t) - x_T).float()
        x = sched.step(eps, t, x, **kwargs).prev_sample
    raise AssertionError("unreachable: step < num_inference_steps is checked at construction")


def minmax_per_channel(x: np.ndarray) -> np.ndarray:
    """Scale each channel of ``[..., C, H, W]`` to [0, 1] (a constant channel becomes 0)."""
    lo = x.min(axis=(-2, -1), keepdims=True)
    span = x.max(axis=(-2, -1), keepdims=True) - lo
    return (x - lo) / np.where(span > 0, span, 1.0)


def mean_pairwise_ssim(diffs: np.ndarray) -> float:
    """Mean SSIM over all pairs of ``[n, C, H, W]`` images in [0, 1] (channels averaged).

    The window is 7 pixels (skimage's default) or the largest odd size that fits the latent.
    """
    from skimage.metrics import structural_similarity

    n, _, h, w = diffs.shape
    if n < 2:
        raise DataError("noise_ssim: need at least 2 seeds to compare")
    win = min(7, h, w)
    win -= 1 - win % 2
    if win < 3:
        raise DataError(f"noise_ssim: latents of {h}x{w} are too small for SSIM (need >= 3x3)")
    return float(
        np.mean(
            [
                structural_similarity(diffs[i], diffs[j], data_range=1.0, channel_axis=0, win_size=win)
                for i, j in combinations(range(n), 2)
            ]
        )
    )


class NoiseSSIM(Detector):
    """NeMo's noise-difference SSIM over ``n_seeds`` seeds at sampling step ``step``."""

    name = "noise_ssim"

    def __init__(self, n_seeds: int = 10, step: int = 0, num_inference_steps: int = 50) -> None:
        self.n_seeds = check_int(n_seeds, "detect.n_seeds", 2)
        self.num_inference_steps = check_int(num_inference_steps, "detect.num_inference_steps", 1)
        self.step = check_int(step, "detect.step", 0)
        if self.step >= self.num_inference_steps:
            raise ConfigError(f"detect.step must be < num_inference_steps={self.num_inference_steps} (got {self.step})")

    @property
    def per_prompt(self) -> int:
        return self.n_seeds

    def score_rows(
        self, pipe: StableDiffusionPipeline, cond: torch.Tensor, seeds: list[int], resolution: int
    ) -> torch.Tensor:
        return noise_differences(pipe, cond, seeds, resolution, self.step, self.num_inference_steps)

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """``[N, n_seeds, C, h, w]`` noise differences -> mean pairwise SSIM per prompt."""
        return np.array([mean_pairwise_ssim(minmax_per_channel(d)) for d in values])
