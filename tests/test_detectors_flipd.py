"""FLIPD (Kamkari et al. 2024): recovers the dimension of a Gaussian on a linear subspace from its
analytic score, and as a detector runs the sampler plus one probe per generation, in fp32 and bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.detectors import DETECTORS, count_unet_evals
from diffmem.detectors.flipd import flipd
from diffmem.errors import ConfigError
from diffmem.models import load_pipeline

CAPTIONS = ["the zorblax emblem", "a red circle above a blue square on a grey background", "a vintage poster"]


def subspace_gaussian(dim: int, k: int, alpha_bar: float, seed: int = 0):
    """Data ``U z`` (``z ~ N(0, I_k)``, ``U`` orthonormal ``[dim, k]``) and the exact noise prediction
    of the VP-noised density ``N(0, a U U^T + (1 - a) I)``: ``eps(y) = sigma Sigma^-1 y``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
    sigma2 = 1 - alpha_bar
    cov = alpha_bar * u @ u.T + sigma2 * torch.eye(dim, dtype=torch.float64)
    precision = torch.linalg.inv(cov).float()

    def eps_fn(y: torch.Tensor) -> torch.Tensor:
        return sigma2**0.5 * y.flatten(1) @ precision

    return u.float(), eps_fn


@pytest.mark.parametrize("k", [2, 7])
def test_flipd_recovers_the_dimension_of_a_subspace_gaussian(k):
    dim, alpha_bar = 48, 0.999
    u, eps_fn = subspace_gaussian(dim, k, alpha_bar)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(1)) @ u.T  # 6 points on the subspace
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    lid = flipd(eps_fn, x, alpha_bar, n_probes=400, generators=gens)
    assert lid.shape == (6,)
    # the exact value for this density (-> k as sigma -> 0): k (1 - sigma^2) + sigma^2 a ||x||^2
    sigma2 = 1 - alpha_bar
    exact = k * (1 - sigma2) + sigma2 * alpha_bar * x.pow(2).sum(1)
    np.testing.assert_allclose(lid.numpy(), exact.numpy(), atol=0.6)  # Hutchinson error, 400 probes
    assert abs(lid.mean().item() - k) < 0.3
    # off the subspace the estimate is no longer k: the data's normal directions count too
    off = x + 0.5 * torch.randn(6, dim, generator=torch.Generator().manual_seed(2))
    assert (flipd(eps_fn, off, alpha_bar, 400, gens) > k + 5).all()


def test_flipd_detector_costs_and_determinism(tiny_pipe):
    settings = dict(num_inference_steps=3, guidance_scale=3.0, n_generations=2, n_probes=2)
    det = DETECTORS.build("flipd", **settings)
    with count_unet_evals(tiny_pipe.unet) as used:
        scores = det.score(tiny_pipe, CAPTIONS, [4, 5, 6], resolution=32, batch_size=6)
    assert used.evals == len(CAPTIONS) * 2 * (2 * 3 + 2)  # guided sampler + the probes, per generation
    one_by_one = det.score(tiny_pipe, CAPTIONS, [4, 5, 6], resolution=32, batch_size=1)
    np.testing.assert_allclose(scores, one_by_one, rtol=1e-4)  # a prompt's score ignores its batch
    dim = tiny_pipe.unet.config.in_channels * tiny_pipe.unet.config.sample_size**2
    assert np.isfinite(scores).all() and (np.abs(scores) < 10 * dim).all() and len(set(scores)) == 3
    with pytest.raises(ConfigError, match="t0"):
        DETECTORS.build("flipd", t0=1.5)


def test_flipd_detector_runs_in_bf16(tiny_pipe_dir):
    pipe = load_pipeline(tiny_pipe_dir).to(torch.bfloat16)
    det = DETECTORS.build("flipd", num_inference_steps=2, guidance_scale=5.0)
    scores = det.score(pipe, CAPTIONS[:2], resolution=32)
    assert scores.dtype == np.float64 and np.isfinite(scores).all() and scores[0] != scores[1]
