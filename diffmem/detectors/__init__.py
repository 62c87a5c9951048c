"""Memorisation detectors that need no training set (docs/methods.md section 2).

``DETECTORS.build(name, **settings)`` (or :func:`build_detector` from a ``detect`` config)
gives a :class:`Detector` whose ``score(pipe, captions, prompt_ids, seed=...)`` returns one
score per prompt, **higher = more likely memorised**:

- ``noise_norm``: Wen et al. (ICLR 2024), ``|| eps(x_t, c) - eps(x_t, c0) ||_2``; per-token
  attribution via ``attribute(pipe, caption)``.
- ``noise_ssim``: NeMo, SSIM between seeds' normalised noise differences ``eps - x_T``.
- ``one_step``: Webster's whitebox one-step ``MSE(x_T, x_0)``.
- ``attention_entropy``: Ren et al. (ECCV 2024), entropy of the cross-attention over tokens.
- ``bright_ending``: Chen et al. (ICLR 2025), Wen's magnitude under the last step's end-token
  attention map.
- ``flipd``: Kamkari et al. (NeurIPS 2024), minus the local intrinsic dimension (FLIPD) of a
  generated sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from diffmem.detectors.base import Detector, UnetCounter, count_unet_evals
from diffmem.registry import Registry

DETECTORS = Registry("detector", expects=Detector)
DETECTORS.register("noise_norm", "diffmem.detectors.noise_norm:NoiseNorm")
DETECTORS.register("noise_ssim", "diffmem.detectors.noise_ssim:NoiseSSIM")
DETECTORS.register("one_step", "diffmem.detectors.one_step:OneStep")
DETECTORS.register("attention_entropy", "diffmem.detectors.attention_entropy:AttentionEntropy")
DETECTORS.register("bright_ending", "diffmem.detectors.bright_ending:BrightEnding")
DETECTORS.register("flipd", "diffmem.detectors.flipd:FLIPD")


def build_detector(cfg: Mapping[str, Any]) -> Detector:
    """The detector of a ``detect`` config (``name`` + its settings), settings checked."""
    from omegaconf import DictConfig, OmegaConf

    settings = cast(
        "dict[str, Any]", OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    )
    if not isinstance(settings, Mapping) or "name" not in settings:
        from diffmem.errors import ConfigError

        raise ConfigError("detect: needs a 'name' (one of " + ", ".join(DETECTORS.names()) + ")")
    name = settings.pop("name")
    return DETECTORS.get(name).from_config(settings)


__all__ = ["DETECTORS", "Detector", "UnetCounter", "build_detector", "count_unet_evals"]
