"""Utility metrics: does a (mitigated) model still make good, varied, on-prompt images?

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature
  sets, in any registered descriptor space (Inception pool features give FID; pixel, SSCD or
  CLIP features give the same statistic in their space). Lower = closer distributions.
- :func:`diversity`: mean pairwise cosine similarity among the generations of each prompt
  (lower = more diverse), averaged over prompts.
- :func:`clip_score`: Hessel et al.'s CLIPScore, ``w * max(cos(image, text), 0)`` averaged,
  from L2-normalised CLIP image and text features.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd

from diffmem.errors import DataError
from diffmem.metrics.replication import Metric, as_array


def gaussian_stats(features: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, D]`` features (``N >= 2``)."""
    x = as_array(features, "features", ndim=2)
    if x.shape[0] < 2:
        raise DataError(f"features: need >= 2 rows for a covariance (got {x.shape[0]})")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(features_a: npt.ArrayLike, features_b: npt.ArrayLike, eps: float = 1e-6) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of the two feature sets.

    As in the reference FID code: when the matrix square root is singular, ``eps`` is added
    to both diagonals; a tiny imaginary part from numerical error is dropped.
    """
    mu_a, s_a = gaussian_stats(features_a)
    mu_b, s_b = gaussian_stats(features_b)
    if mu_a.shape != mu_b.shape:
        raise DataError(f"features: dimensions differ ({mu_a.shape[0]} vs {mu_b.shape[0]})")
    from scipy import linalg  # here: scipy costs ~0.4 s to import, and every stage imports this module

    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(s_a.shape[0]) * eps
        covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def diversity(features: npt.ArrayLike, prompt_ids: npt.ArrayLike) -> float:
    """Mean over prompts of the mean pairwise cosine among that prompt's generations.

    ``features`` are L2-normalised ``[N, D]`` rows; ``prompt_ids`` ``[N]``. Prompts with one
    generation are skipped; at least one prompt needs two.
    """
    x = as_array(features, "features", ndim=2)
    ids = np.asarray(prompt_ids)
    if ids.shape != (x.shape[0],):
        raise DataError(f"prompt_ids: {ids.shape[0]} ids for {x.shape[0]} feature rows")
    per = []
    for _, idx in pd.Series(np.arange(len(ids))).groupby(ids):
        f = x[idx.to_numpy()]
        if len(f) < 2:
            continue
        sims = f @ f.T
        per.append((sims.sum() - np.trace(sims)) / (len(f) * (len(f) - 1)))
    if not per:
        raise DataError("diversity: no prompt has two or more generations")
    return float(np.mean(per))


def clip_score(image_features: npt.ArrayLike, text_features: npt.ArrayLike, w: float = 100.0) -> float:
    """CLIPScore: ``w * mean(max(cos(image_i, text_i), 0))`` over row-aligned pairs."""
    a = as_array(image_features, "image_features", ndim=2)
    b = as_array(text_features, "text_features", ndim=2)
    if a.shape != b.shape:
        raise DataError(f"clip_score: image features {a.shape} and text features {b.shape} differ")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(w * np.clip(cos, 0, None).mean())


class FrechetDistance(Metric):
    name, higher_is_better, fn = "frechet_distance", False, staticmethod(frechet_distance)


class Diversity(Metric):
    name, higher_is_better, fn = "diversity", False, staticmethod(diversity)


class ClipScore(Metric):
    name, higher_is_better, fn = "clip_score", True, staticmethod(clip_score)
