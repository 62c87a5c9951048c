"""NeMo (Hintersdorf et al., NeurIPS 2024): find the neurons that carry a prompt's memorisation.

Neurons are the output channels of the cross-attention value projections (``attn2.to_v``)
in the down and mid blocks (:func:`~diffmem.probes.layers.value_layers`). A prompt's
activation of a neuron is its absolute ``to_v`` output averaged over tokens, z-scored against
the mean and std over many non-memorised prompts. Memorisation is judged by the noise-diff
SSIM detector (``noise_ssim``) against a threshold calibrated on non-memorised prompts
(mean + 1 std). Search:

1. initial selection: block every neuron with ``|z| > theta`` plus the top-``k`` per layer,
   lowering ``theta`` from 5 by 0.25 (floor 1) and raising ``k`` by 1, until the blocked
   model's score falls under the threshold;
2. refinement: unblock whole layers, then single neurons (weakest first), whenever the
   memorisation stays suppressed without them.

Blocking zeroes the channels in every forward pass (:func:`~diffmem.probes.layers.block_neurons`).
The neurons found per prompt are stored as ``neurons.json`` (:func:`save_neurons`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffmem.errors import ConfigError, DataError
from diffmem.probes.layers import block_neurons, get_layers, value_layers
from diffmem.runs import write_json

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    from diffmem.detectors.base import Detector

Neurons = dict[str, list[int]]
NEURONS_FILE = "neurons.json"  # a run dir's neurons per memorised prompt


@torch.no_grad()
def value_activations(
    pipe: StableDiffusionPipeline, cond: torch.Tensor, layers: Iterable[str], batch_size: int = 64
) -> dict[str, np.ndarray]:
    """``{layer: [N, channels]}``: mean |to_v output| over tokens for each conditioning row.

    A cross-attention value projection sees only the text conditioning (SD's ``attn2``
    applies ``to_v`` to ``encoder_hidden_states`` as they come), so ``to_v(c)`` alone gives
    exactly the activations of a UNet forward, at a tiny fraction of its cost. A UNet that
    transforms the conditioning first (``encoder_hid_proj``, ``norm_cross``) is refused.
    """
    unet = pipe.unet
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    modules = get_layers(unet, list(layers))
    owners = dict(unet.named_modules())
    for name in modules:
        attn = owners.get(name.rsplit(".", 1)[0])
        if getattr(unet, "encoder_hid_proj", None) is not None or getattr(attn, "norm_cross", None) is not None:
            raise ConfigError(
                f"{name}: the UNet transforms the text conditioning before its value "
                "projections; NeMo's activations assume SD's attn2"
            )
    for i in range(0, cond.shape[0], batch_size):
        c = cond[i : i + batch_size].to(unet.device, unet.dtype)
        for name, module in modules.items():
            out[name].append(module(c).abs().mean(dim=1).float().cpu().numpy())
    return {name: np.concatenate(v) for name, v in out.items()}


@dataclass
class ActivationStats:
    """Per-neuron mean and std of the activations of non-memorised prompts."""

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]

    @classmethod
    def fit(cls, activations: dict[str, np.ndarray]) -> ActivationStats:
        n = next(iter(activations.values())).shape[0]
        if n < 2:
            raise DataError(f"NeMo needs >= 2 non-memorised prompts for activation statistics (got {n})")
        return cls(
            {k: v.mean(0) for k, v in activations.items()}, {k: v.std(0, ddof=1) for k, v in activations.items()}
        )

    def zscores(self, activations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (v - self.mean[k]) / np.where(self.std[k] > 0, self.std[k], 1.0) for k, v in activations.items()}


@dataclass
class Localisation:
    """NeMo's result for one prompt."""

    neurons: Neurons
    score_before: float
    score_after: float
    suppressed: bool
    checks: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def n_neurons(self) -> int:
        return sum(len(v) for v in self.neurons.values())


def _select(z: dict[str, np.ndarray], theta: float, k: int) -> Neurons:
    out = {}
    for name, v in z.items():
        chosen = set(np.flatnonzero(np.abs(v) > theta).tolist())
        if k > 0:
            chosen |= set(np.argsort(-v, kind="stable")[:k].tolist())
        if chosen:
            out[name] = sorted(chosen)
    return out


def localise(
    z: dict[str, np.ndarray],
    score: Callable[[Neurons], float],
    threshold: float,
    *,
    theta_start: float = 5.0,
    theta_step: float = 0.25,
    theta_min: float = 1.0,
    refine: bool = True,
    max_checks: int | None = None,
) -> Localisation:
    """NeMo's search for one prompt with z-scores ``z`` (``{layer: [channels]}``, one row).

    ``score(neurons)`` is the memorisation score with ``neurons`` blocked (higher = memorised);
    memorisation counts as suppressed once it is ``<= threshold``. ``max_checks`` caps the
    scored candidates (each costs a detector run): the search stops with what it has then.
    """
    checks = 0

    def spent() -> bool:
        return max_checks is not None and checks >= max_checks

    def suppressed(neurons: Neurons) -> tuple[bool, float]:
        nonlocal checks
        checks += 1
        s = score(neurons)
        return s <= threshold, s

    before = score({})
    history = [{"phase": "none", "n_neurons": 0, "score": before}]
    if before <= threshold:
        return Localisation({}, before, before, True, 1, history)
    total = sum(v.size for v in z.values())
    theta, k = theta_start, 0
    while True:
        neurons = _select(z, theta, k)
        ok, s = suppressed(neurons)
        history.append(
            {"phase": "initial", "theta": theta, "k": k, "n_neurons": sum(map(len, neurons.values())), "score": s}
        )
        if ok or sum(map(len, neurons.values())) >= total or spent():
            break
        theta, k = max(theta - theta_step, theta_min), k + 1
    if ok and refine:
        for layer in list(neurons):
            if spent():
                break
            trial = {n: v for n, v in neurons.items() if n != layer}
            ok_t, s_t = suppressed(trial)
            if ok_t:
                neurons, s = trial, s_t
        order = sorted(((abs(z[n][i]), n, i) for n, idx in neurons.items() for i in idx))
        for _, layer, i in order:
            if spent():
                break
            trial = {n: [j for j in v if not (n == layer and j == i)] for n, v in neurons.items()}
            trial = {n: v for n, v in trial.items() if v}
            ok_t, s_t = suppressed(trial)
            if ok_t:
                neurons, s = trial, s_t
        history.append(
            {"phase": "refined", "n_neurons": sum(map(len, neurons.values())), "score": s, "capped": spent()}
        )
    return Localisation(neurons, before, s, bool(ok), checks + 1, history)


def blocked_score(
    pipe: StableDiffusionPipeline, detector: Detector, cond: torch.Tensor, prompt_id: int, *, seed: int, resolution: int
) -> Callable[[Neurons], float]:
    """``score(neurons)``: the detector's score of one conditioning with ``neurons`` blocked."""

    def score(neurons: Neurons) -> float:
        with block_neurons(pipe.unet, neurons):
            return float(
                detector.score_conditioning(pipe, cond[None], [prompt_id], seed=seed, resolution=resolution)[0]
            )

    return score


def nemo_layers(pipe: StableDiffusionPipeline, blocks: Sequence[str] = ("down", "mid")) -> list[str]:
    """NeMo's layer names in ``pipe.unet``: the value projections of ``blocks``."""
    return list(value_layers(pipe.unet, blocks))


def save_neurons(run_dir: str | Path, found: dict) -> Path:
    """Store ``{prompt_id: localisation}`` (JSON-ready dicts) as ``<run_dir>/neurons.json``."""
    return write_json(Path(run_dir) / NEURONS_FILE, {str(int(k)): v for k, v in found.items()})
