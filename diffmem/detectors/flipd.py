"""FLIPD (Kamkari et al., NeurIPS 2024): the local intrinsic dimension of a generated sample.

A diffusion model's noisy densities ``p_t`` obey ``log p_t(x) ~ (k - D) log sigma`` near data of
local dimension ``k`` in ``R^D``, so the rate at which ``log p_t`` changes with the noise level
gives ``k``. Through the Fokker-Planck equation that rate needs only the score at one small time
``t0``. For a variance-preserving model (``x_t = psi x_0 + sigma eps``, ``psi^2 = a_t`` the
cumulative alpha, ``sigma^2 = 1 - a_t``) and the score ``s = -eps / sigma`` at ``y = psi x``::

    FLIPD(x, t0) = D + sigma^2 [tr(d s / d y) + ||s||^2] = D - sigma tr(d eps / d y) + ||eps(y)||^2

The trace is Hutchinson's estimate ``E_v[v^T J v]`` over Rademacher vectors ``v``, each ``v^T J``
one vector-Jacobian product (a backward pass through the UNet).

As a memorisation detector (Ross, Kamkari et al. 2025): a memorised prompt's generation sits on a
copy of a training image, a point the conditional model has collapsed onto, so its LID is **low**.
The score is ``-FLIPD`` (higher = memorised), averaged over generations. Each generation costs the
guided sampler (``2 * num_inference_steps`` UNet evaluations) plus ``n_probes`` conditional
evaluations with their backward passes, all in latent space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from diffmem.checks import check_float, check_int
from diffmem.detectors.base import Detector, to_epsilon, uncond_embedding
from diffmem.errors import ConfigError
from diffmem.sampling import denoise, fresh_scheduler

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

__all__ = ["FLIPD", "flipd"]


def flipd(
    eps_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    alpha_bar: float,
    n_probes: int,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """FLIPD at clean points ``x`` ``[B, ...]`` (float32 ``[B]``).

    ``eps_fn(y)`` is the model's noise prediction at ``t0`` for ``[n_probes * B, ...]`` inputs
    (probe-major: rows ``j * B + i`` belong to point ``i``); ``alpha_bar`` is ``a_t0``. One
    Rademacher vector per (probe, point) is drawn from that point's generator.
    """
    b = x.shape[0]
    psi, sigma = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    probes = torch.stack(
        [torch.randint(0, 2, (n_probes, *x.shape[1:]), generator=g).float() * 2 - 1 for g in generators], dim=1
    )  # [n_probes, B, ...]
    y = (psi * x.float()).repeat(n_probes, *[1] * (x.ndim - 1)).to(x.dtype).detach().requires_grad_(True)
    v = probes.flatten(0, 1).to(x.device)
    with torch.enable_grad():
        eps = eps_fn(y)
        (vjp,) = torch.autograd.grad(eps, y, grad_outputs=v.to(eps.dtype))
    quad = (vjp.float() * v).flatten(1).sum(1).view(n_probes, b)  # v^T J v per probe
    sq_norm = eps.detach().float().flatten(1).pow(2).sum(1).view(n_probes, b)[0]
    return x[0].numel() - sigma * quad.mean(0) + sq_norm


class FLIPD(Detector):
    """Minus the FLIPD local intrinsic dimension of each generation (see the module docstring)."""

    name = "flipd"

    def __init__(
        self,
        t0: float = 0.05,
        n_probes: int = 1,
        n_generations: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
    ):
        self.t0 = check_float(t0, "detect.t0", 0.0)
        if not 0 < self.t0 < 1:
            raise ConfigError(f"detect.t0 must be in (0, 1), a share of the training schedule (got {t0})")
        self.n_probes = check_int(n_probes, "detect.n_probes", 1)
        self.n_generations = check_int(n_generations, "detect.n_generations", 1)
        self.num_inference_steps = check_int(num_inference_steps, "detect.num_inference_steps", 1)
        self.guidance_scale = check_float(guidance_scale, "detect.guidance_scale", 0.0)

    def score_rows(
        self, pipe: StableDiffusionPipeline, cond: torch.Tensor, seeds: list[int], resolution: int
    ) -> torch.Tensor:
        """Minus FLIPD of each row's sample ``[B]``: the guided sampler, then the probes at ``t0``."""
        uncond = uncond_embedding(self, pipe) if self.guidance_scale != 1.0 else None
        for x in denoise(pipe, cond, seeds, resolution, self.num_inference_steps, self.guidance_scale, uncond):  # noqa: B007 (x: the sample)
            pass
        sched = fresh_scheduler(pipe, self.num_inference_steps)
        alphas = getattr(sched, "alphas_cumprod", None)
        if alphas is None:
            raise ConfigError(f"flipd: scheduler {type(sched).__name__} has no alphas_cumprod")
        t = min(round(self.t0 * len(alphas)), len(alphas) - 1)
        cond_rep = cond.repeat(self.n_probes, 1, 1)

        def eps_fn(y: torch.Tensor) -> torch.Tensor:
            return to_epsilon(sched, pipe.unet(y, t, encoder_hidden_states=cond_rep).sample, y, t)

        generators = [torch.Generator().manual_seed(int(s) + 2) for s in seeds]  # +1 is the sampler's
        return -flipd(eps_fn, x, float(alphas[t]), self.n_probes, generators)
