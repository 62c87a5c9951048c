"""Inference-time mitigations: wrappers that change the conditioning, not the weights.

A defence is saved as a folder holding ``defence.json`` (``{"defence", "settings", "base"}``,
``base`` = the diffusers model it wraps: a repo id, or a local folder). This module owns
that format (:func:`save_defence`, :func:`read_defence`, :func:`is_defence`, and
:func:`wrapped`, the reader the package root registers for :func:`diffmem.loading.load_model`),
which loads such a folder as the base pipeline with the defence as its sampler hooks
(:class:`diffmem.sampling.SamplerHooks`), so every stage takes it as
``model=local model.path=<folder>``. The sampler applies it: :meth:`Defence.text` to the
captions (:func:`diffmem.sampling.encode_prompts`) and :meth:`Defence.embedding` to the
conditioning of each generation (:func:`diffmem.sampling.denoise`), seeded per sample.
Conditionings that bypass the text (trigger search) meet only the embedding part.

- ``gni``: Gaussian noise on the text embedding (Somepalli et al.; ``lam`` 0.1).
- ``random_tokens``: random words inserted into the prompt (Somepalli et al.'s RT at inference).
- ``wen``: Wen et al.'s prompt-embedding minimisation: at the first sampling step, AdamW on
  the conditioning (BOS token frozen) lowers the noise norm ``||eps(x_T, c) - eps(x_T, c0)||``
  of each generation's own ``x_T`` until it is at most ``target`` (<= ``max_iters`` steps),
  optionally pulled towards the original by an L2 term.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffmem.checks import check_positive
from diffmem.data.datasets import check_regular
from diffmem.errors import ConfigError, DataError
from diffmem.models.adapters import model_reference
from diffmem.registry import Registry
from diffmem.runs import read_json, write_json
from diffmem.sampling import SamplerHooks

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

DEFENCE_FILE = "defence.json"
DEFENCES = Registry("defence")


class Defence(SamplerHooks):
    """Sampler hooks that change nothing; subclasses override :meth:`text` and/or :meth:`embedding`."""

    name = "none"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def settings(self) -> dict:
        return {"seed": self.seed}

    def text(self, captions: Sequence[str], pipe: StableDiffusionPipeline | None = None) -> list[str]:
        return list(captions)

    def embedding(
        self,
        pipe: StableDiffusionPipeline,
        cond: torch.Tensor,
        seeds: Sequence[int],
        *,
        resolution: int,
        steps: int,
        guidance: float,
    ) -> torch.Tensor:
        return cond


def _caption_rng(seed: int, caption: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), *caption.encode("utf-8")])


@DEFENCES.register("gni")
class GaussianNoise(Defence):
    """``c + lam * N(0, I)``, the noise drawn from the generation's seed."""

    name = "gni"

    def __init__(self, lam: float = 0.1, seed: int = 0) -> None:
        super().__init__(seed)
        if not float(lam) >= 0:
            raise ConfigError(f"mitigation.lam must be >= 0 (got {lam})")
        self.lam = float(lam)

    def settings(self) -> dict:
        return {"lam": self.lam, "seed": self.seed}

    def embedding(
        self, pipe: StableDiffusionPipeline, cond: torch.Tensor, seeds: Sequence[int], **_: Any
    ) -> torch.Tensor:
        noise = torch.stack(
            [
                torch.randn(cond.shape[1:], generator=torch.Generator().manual_seed(int(s) + self.seed + 7))
                for s in seeds
            ]
        )
        return cond + self.lam * noise.to(cond.device, cond.dtype)


@DEFENCES.register("random_tokens")
class RandomTokens(Defence):
    """``n_words`` random vocabulary words inserted into each non-empty prompt (seeded by the prompt)."""

    name = "random_tokens"

    def __init__(self, n_words: int = 2, seed: int = 0) -> None:
        super().__init__(seed)
        check_positive(n_words, "mitigation.n_words")
        self.n_words = int(n_words)
        self._pool: list[str] | None = None

    def settings(self) -> dict:
        return {"n_words": self.n_words, "seed": self.seed}

    def text(self, captions: Sequence[str], pipe: StableDiffusionPipeline | None = None) -> list[str]:
        from diffmem.mitigations.captions import insert_random_words, word_pool

        if self._pool is None:
            assert pipe is not None  # the sampler passes its pipeline
            self._pool = word_pool(pipe.tokenizer)
        return [
            insert_random_words(c, self._pool, self.n_words, _caption_rng(self.seed, c)) if c else c for c in captions
        ]


@DEFENCES.register("wen")
class WenMinimisation(Defence):
    """Wen et al.'s inference-time mitigation (see the module docstring)."""

    name = "wen"

    def __init__(self, target: float, lr: float = 0.05, max_iters: int = 10, pull: float = 0.0, seed: int = 0) -> None:
        super().__init__(seed)
        if target is None or not float(target) > 0:
            raise ConfigError(f"mitigation.target must be > 0 (got {target})")
        check_positive(max_iters, "mitigation.max_iters")
        if not float(lr) > 0 or float(pull) < 0:
            raise ConfigError(f"mitigation: need lr > 0, pull >= 0 (got {lr}, {pull})")
        self.target, self.lr, self.max_iters, self.pull = float(target), float(lr), int(max_iters), float(pull)

    def settings(self) -> dict:
        return {"target": self.target, "lr": self.lr, "max_iters": self.max_iters, "pull": self.pull, "seed": self.seed}

    def embedding(
        self,
        pipe: StableDiffusionPipeline,
        cond: torch.Tensor,
        seeds: Sequence[int],
        *,
        resolution: int,
        steps: int,
        guidance: float,
    ) -> torch.Tensor:
        from diffmem.detectors.noise_norm import noise_norm_trajectory
        from diffmem.sampling import encode_prompts

        uncond = encode_prompts(pipe, [""])
        start = cond.detach().float()
        rest = start[:, 1:].clone().requires_grad_(True)  # BOS (token 0) stays frozen
        opt = torch.optim.AdamW([rest], lr=self.lr, weight_decay=0.0)
        with torch.enable_grad():
            for _ in range(self.max_iters):
                c = torch.cat([start[:, :1], rest], 1).to(cond.dtype)
                d = noise_norm_trajectory(pipe, c, uncond, seeds, resolution, [0], steps, guidance)[:, 0]
                active = d.detach() > self.target
                if not active.any():
                    break
                loss = d + self.pull * ((rest - start[:, 1:]) ** 2).flatten(1).sum(1)
                before = rest.detach().clone()
                opt.zero_grad(set_to_none=True)
                (loss * active).sum().backward()
                opt.step()
                with torch.no_grad():  # rows at the target keep their embedding
                    rest[~active] = before[~active]
        return torch.cat([start[:, :1], rest.detach()], 1).to(cond.dtype)


def build_defence(name: str, settings: dict) -> Defence:
    """The registered defence ``name`` with ``settings`` (unknown fields name themselves)."""
    cls = DEFENCES.get(name)
    try:
        return cls(**settings)
    except TypeError as err:
        raise ConfigError(f"defence '{name}': {err}") from err


def save_defence(out_dir: str | Path, defence: Defence, base: str | Path) -> Path:
    """Write the wrapper folder (``defence.json``) for ``defence`` over the model at ``base``.

    ``base`` is stored as given (a repo id stays a repo id), made absolute only when it is an
    existing local path, so the wrapper reloads from any working directory.
    """
    out = Path(out_dir)
    write_json(
        out / DEFENCE_FILE, {"defence": defence.name, "settings": defence.settings(), "base": model_reference(base)}
    )
    return out


def is_defence(folder: str | Path) -> bool:
    """Whether ``folder`` is a defence wrapper (holds ``defence.json``)."""
    return (Path(folder).expanduser() / DEFENCE_FILE).exists()


def wrapped(folder: str | Path) -> tuple[str, Defence] | None:
    """(base, defence) of a wrapper folder, None for any other folder: the defence format's
    reader in :data:`diffmem.registry.MODEL_WRAPPERS`."""
    return read_defence(folder) if is_defence(folder) else None


def read_defence(folder: str | Path) -> tuple[str, Defence]:
    """(base model: repo id or path, defence) of a wrapper folder."""
    path = Path(folder).expanduser() / DEFENCE_FILE
    check_regular(path)
    spec = read_json(path)
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a JSON object with defence, settings and base")
    for field, kind in (("defence", str), ("settings", dict), ("base", str)):
        if not isinstance(spec.get(field), kind):
            raise DataError(
                f"{path}: field '{field}' "
                + ("missing" if field not in spec else f"must be a {'string' if kind is str else 'mapping'}")
            )
    return spec["base"], build_defence(spec["defence"], dict(spec["settings"]))
