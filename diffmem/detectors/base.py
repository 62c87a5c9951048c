"""What every detector shares: the :class:`Detector` interface, settings checks, UNet call counting."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diffmem import distributed
from diffmem.checks import check_int, check_positive
from diffmem.errors import ConfigError, DataError
from diffmem.sampling import encode_prompts, fresh_scheduler, initial_latents, sample_seed, token_counts, vae_factor

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline


class Detector:
    """Scores prompts without the training set: **higher = more likely memorised**.

    Subclasses take their settings as keyword arguments (checked at construction, raising
    ``ConfigError``) and implement :meth:`score_rows`. Seeds are per (prompt, generation)
    (:func:`~diffmem.sampling.sample_seed`), so a prompt's score does not depend on the
    other prompts in its batch or run.
    """

    name: str = "detector"
    supports_attribution: bool = False
    #: ``score_rows`` also takes ``n_tokens`` (each row's caption length, BOS and EOS included)
    needs_token_counts: bool = False
    _uncond: tuple[StableDiffusionPipeline, torch.Tensor]  # uncond_embedding's cache (set on first use)

    @classmethod
    def from_config(cls, settings: dict) -> Detector:
        """``cls(**settings)`` with unknown settings reported as a ``ConfigError``."""
        try:
            inspect.signature(cls).bind(**settings)
        except TypeError as err:
            known = [p for p in inspect.signature(cls).parameters]
            raise ConfigError(f"detect.{cls.name}: {err} (settings: {', '.join(known)})") from None
        return cls(**settings)

    #: generations (seeds) per prompt, for the detectors that call them so
    n_generations: int = 1

    @property
    def per_prompt(self) -> int:
        """Generations (seeds) per prompt: ``n_generations``, or what a detector calls them."""
        return self.n_generations

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in inspect.signature(type(self)).parameters}

    def score(
        self,
        pipe: StableDiffusionPipeline,
        captions: Sequence[str],
        prompt_ids: Sequence[int] | None = None,
        *,
        seed: int = 0,
        resolution: int | None = None,
        batch_size: int = 16,
    ) -> np.ndarray:
        """One score per caption (float64 ``[N]``); ``prompt_ids`` default to ``0..N-1``."""
        captions = [str(c) for c in captions]
        if not captions:
            raise DataError(f"{self.name}: the prompt list is empty")
        n_tokens = token_counts(pipe, captions) if self.needs_token_counts else None
        return self.score_conditioning(
            pipe,
            encode_prompts(pipe, captions),
            prompt_ids,
            seed=seed,
            resolution=resolution,
            batch_size=batch_size,
            names=captions,
            n_tokens=n_tokens,
        )

    def score_conditioning(
        self,
        pipe: StableDiffusionPipeline,
        cond: torch.Tensor,
        prompt_ids: Sequence[int] | None = None,
        *,
        seed: int = 0,
        resolution: int | None = None,
        batch_size: int = 16,
        names: Sequence[str] | None = None,
        n_tokens: Sequence[int] | None = None,
    ) -> np.ndarray:
        """:meth:`score` for text-encoder outputs ``cond`` ``[N, tokens, D]`` (e.g. searched triggers);
        ``n_tokens`` (each row's token count) for detectors that need it."""
        if cond.shape[0] == 0:
            raise DataError(f"{self.name}: the prompt list is empty")
        if self.needs_token_counts and (n_tokens is None or len(n_tokens) != cond.shape[0]):
            raise DataError(f"{self.name}: needs each prompt's token count (n_tokens) beside its conditioning")
        names = list(names) if names is not None else [f"embedding {i}" for i in range(cond.shape[0])]
        prompt_ids = list(range(cond.shape[0])) if prompt_ids is None else [int(p) for p in prompt_ids]
        if len(prompt_ids) != cond.shape[0]:
            raise DataError(f"{self.name}: {len(prompt_ids)} prompt ids for {cond.shape[0]} prompts")
        check_positive(batch_size, "batch_size")
        resolution = int(resolution or pipe.unet.config.sample_size * vae_factor(pipe))
        cond = cond.to(pipe.unet.device, pipe.unet.dtype)
        b = int(batch_size)
        out = distributed.deal(  # each rank of a split stage scores its blocks of prompts
            len(prompt_ids),
            lambda idx: self._score_prompts(pipe, cond, idx, prompt_ids, seed, resolution, b, n_tokens),
            self.prompt_block(b),
        )
        if not np.isfinite(out).all():
            bad = [names[i] for i in np.flatnonzero(~np.isfinite(out))[:3]]
            raise DataError(f"{self.name}: non-finite scores (e.g. for {bad!r}); check the model weights")
        return out

    def prompt_block(self, batch_size: int) -> int:
        """Prompts per block when ranks split the scoring: whole batches of whole prompts, so
        each rank's batches are those one process forms (and the scores the same bits)."""
        return math.lcm(self.per_prompt, int(batch_size)) // self.per_prompt

    def _score_prompts(
        self,
        pipe: StableDiffusionPipeline,
        cond: torch.Tensor,
        idx: Sequence[int] | np.ndarray,
        prompt_ids: list[int],
        seed: int,
        resolution: int,
        batch_size: int,
        n_tokens: Sequence[int] | None,
    ) -> np.ndarray:
        """Scores of the prompts ``idx`` (rows of ``cond``, ``prompt_ids`` and ``n_tokens``): their
        (prompt, generation) rows in batches of ``batch_size``, each prompt reduced once whole."""
        rows = [(int(i), sample_seed(seed, prompt_ids[i], k)) for i in idx for k in range(self.per_prompt)]
        g, scores, pending = self.per_prompt, [], []
        bar = tqdm(total=len(idx), desc=self.name, mininterval=2, disable=len(rows) <= batch_size)
        with torch.no_grad():
            for start in range(0, len(rows), int(batch_size)):
                batch = rows[start : start + int(batch_size)]
                rows_idx = torch.tensor([i for i, _ in batch], device=cond.device)
                extra = {"n_tokens": [int(n_tokens[i]) for i, _ in batch]} if self.needs_token_counts else {}  # type: ignore[index]  # given with needs_token_counts (checked above)
                pending.append(
                    self.score_rows(pipe, cond[rows_idx], [s for _, s in batch], resolution, **extra)
                    .detach()
                    .double()
                    .cpu()
                )
                buf = torch.cat(pending)
                done = buf.shape[0] // g  # reduce finished prompts now: raw values stay small
                if done:
                    scores.append(self.reduce(buf[: done * g].numpy().reshape(done, g, *buf.shape[1:])))
                pending = [buf[done * g :]]
                bar.update(done)
        bar.close()
        return np.concatenate(scores).astype(np.float64)

    def score_rows(
        self, pipe: StableDiffusionPipeline, cond: torch.Tensor, seeds: list[int], resolution: int
    ) -> torch.Tensor:
        """Raw values ``[B, ...]`` for conditioning rows ``cond`` and their seeds (one row each)."""
        raise NotImplementedError

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """``[N, generations, ...]`` raw values -> ``[N]`` scores (default: the mean)."""
        return values.reshape(values.shape[0], -1).mean(axis=1)

    def attribute(
        self,
        pipe: StableDiffusionPipeline,
        caption: str,
        prompt_id: int = 0,
        *,
        seed: int = 0,
        resolution: int | None = None,
    ) -> pd.DataFrame:
        """Per-token attribution (``token_index, token, attribution``) of ``caption``'s score."""
        raise ConfigError(
            f"detector '{self.name}' has no per-token attribution (use detect=noise_norm, or attribution=false)"
        )


def to_epsilon(sched: Any, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """The UNet's ``output`` as a noise prediction (``x`` = the scaled model input at ``t``).

    ``epsilon`` models pass through; ``v_prediction`` ones (SD 2.x 768) are converted with
    ``eps = sqrt(a_t) v + sqrt(1 - a_t) x``.
    """
    kind = getattr(sched.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return output
    if kind == "v_prediction":
        a = sched.alphas_cumprod[int(t)].to(output.device, output.dtype)
        return a.sqrt() * output + (1 - a).sqrt() * x
    raise ConfigError(f"detectors need an epsilon or v_prediction model, not prediction_type '{kind}'")


def check_steps(steps: Sequence[int] | int | str, num_inference_steps: int) -> list[int]:
    """Sorted unique sampling-step indices (0 = first) from a list, one index, or ``"all"``."""
    if isinstance(steps, str):
        if steps != "all":
            raise ConfigError(f"detect.steps must be a list of step indices or 'all' (got {steps!r})")
        steps = range(num_inference_steps)
    if isinstance(steps, (int, np.integer)):
        steps = [steps]
    steps = [check_int(s, "detect.steps", 0) for s in steps]
    if not steps:
        raise ConfigError("detect.steps must name at least one step")
    if max(steps) >= num_inference_steps:
        raise ConfigError(f"detect.steps must be < num_inference_steps={num_inference_steps} (got {max(steps)})")
    return sorted(set(steps))


def guided_steps(
    pipe: StableDiffusionPipeline,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    seeds: Sequence[int],
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    last: int,
    uncond_at_last: bool = True,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Run the guided sampler from each seed's ``x_T`` up to step ``last``; yield per step
    ``(i, t, xin, eps_u, eps_c)`` (``xin`` the scaled model input, raw UNet outputs).

    x_t follows ``eps_u + guidance_scale * (eps_c - eps_u)`` as :func:`diffmem.sampling.sample`
    does. ``uncond`` is ``[1 or B, L, D]``. With ``uncond_at_last=False`` the last step runs the
    conditional rows only (``eps_u`` None): one UNet evaluation per row instead of two.
    Differentiable (wrap in ``torch.no_grad()`` when scoring).
    """
    if uncond.shape[0] == 1:
        uncond = uncond.expand(cond.shape[0], -1, -1)
    sched = fresh_scheduler(pipe, num_inference_steps)
    x = initial_latents(pipe, seeds, resolution) * sched.init_noise_sigma
    generators = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]  # as sampling.sample
    kwargs = {"generator": generators} if "generator" in sched.step.__code__.co_varnames else {}
    for i, t in enumerate(sched.timesteps[: last + 1]):
        xin = sched.scale_model_input(x, t)
        if i == last and not uncond_at_last:
            yield i, t, xin, None, pipe.unet(xin, t, encoder_hidden_states=cond).sample
            return
        eps_u, eps_c = pipe.unet(
            torch.cat([xin, xin]), t, encoder_hidden_states=torch.cat([uncond, cond])
        ).sample.chunk(2)
        yield i, t, xin, eps_u, eps_c
        if i < last:
            x = sched.step(eps_u + guidance_scale * (eps_c - eps_u), t, x, **kwargs).prev_sample


def uncond_embedding(detector: Detector, pipe: StableDiffusionPipeline) -> torch.Tensor:
    """``c0`` (the empty prompt's conditioning) of ``pipe``, cached on ``detector`` per pipeline."""
    cached = getattr(detector, "_uncond", None)
    if cached is None or cached[0] is not pipe:
        detector._uncond = cached = (pipe, encode_prompts(pipe, [""]))
    return cached[1]


@dataclass
class UnetCounter:
    """UNet usage: ``calls`` forward passes, ``evals`` rows through the network (batch sizes summed)."""

    calls: int = 0
    evals: int = 0


@contextlib.contextmanager
def count_unet_evals(unet: UNet2DConditionModel) -> Iterator[UnetCounter]:
    """Count ``unet``'s forward passes and per-sample evaluations while the block runs.

    Wraps ``unet.forward`` (an instance attribute, removed again on exit), so it counts every
    call however it is made. One "evaluation" is one latent through the network: a
    classifier-free-guided step of one sample costs 2.
    """
    counter = UnetCounter()
    had_own = "forward" in vars(unet)
    original = unet.forward

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counter.calls += 1
        counter.evals += int(sample.shape[0])
        return original(sample, *args, **kwargs)

    unet.forward = forward
    try:
        yield counter
    finally:
        if had_own:
            unet.forward = original
        else:
            del unet.forward
