"""Utility metrics against references: a closed-form 1-D Fréchet distance, scipy's sqrtm
formula written out, hand-computed diversity and CLIPScore, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from diffmem.errors import DataError
from diffmem.metrics import METRICS, clip_score, diversity, frechet_distance


def test_frechet_distance_1d_closed_form():
    """Two 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2."""
    a = np.array([[0.0], [2.0]])  # mean 1, unbiased var 2
    b = np.array([[3.0], [5.0], [7.0]])  # mean 5, unbiased var 4
    expected = (1 - 5) ** 2 + (np.sqrt(2) - 2) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_reference_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    b = rng.normal(loc=0.3, scale=1.5, size=(150, 6)) @ rng.normal(size=(6, 6))
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert METRICS.build("frechet_distance")(a, b) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_errors():
    with pytest.raises(DataError, match="dimensions differ"):
        frechet_distance(np.ones((3, 2)), np.ones((3, 4)))
    with pytest.raises(DataError, match="need >= 2 rows"):
        frechet_distance(np.ones((1, 2)), np.ones((3, 2)))


def test_diversity_hand_case():
    f = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    ids = [0, 0, 1, 1, 2]  # prompt 0: cos 0; prompt 1: cos 1; prompt 2 has one generation
    assert diversity(f, ids) == pytest.approx(0.5)
    with pytest.raises(DataError, match="no prompt has two"):
        diversity(f[:1], [0])
    with pytest.raises(DataError, match="2 ids for 5"):
        diversity(f, [0, 1])


def test_clip_score_hand_case():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[0.6, 0.8], [0.0, -1.0]])  # cos 0.6 and -1 (clipped to 0)
    assert clip_score(img, txt) == pytest.approx(100 * 0.3)
    assert clip_score(img, txt, w=2.5) == pytest.approx(2.5 * 0.3)
    with pytest.raises(DataError, match="differ"):
        clip_score(img, txt[:1])
