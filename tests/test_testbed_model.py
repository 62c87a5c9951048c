"""The shipped testbed model memorises as docs/testbeds.md says (a fast re-measurement)."""

from __future__ import annotations

import json

import pytest

from diffmem.config import ASSETS_DIR
from diffmem.data import load_dataset
from diffmem.metrics.memorisation import memorisation_figures
from diffmem.models import load_pipeline

MODEL = ASSETS_DIR / "testbed"


@pytest.fixture(scope="module")
def figures():
    from diffmem.config import compose

    cfg = compose("train", ["experiment=testbed"])
    root, manifest = load_dataset(cfg.data)
    pipe = load_pipeline(MODEL)
    return memorisation_figures(pipe, root, manifest, n_seeds=3, steps=15, n_ordinary=8, n_heldout=8)


def _row(figs, kind, dup):
    return next(r for r in figs["summary"] if r["kind"] == kind and r["dup_count"] == dup)


def test_shipped_model_is_a_plain_diffusers_folder():
    assert (MODEL / "model_index.json").exists() and (MODEL / "memorisation.json").exists()
    recorded = json.loads((MODEL / "memorisation.json").read_text())
    assert {r["dup_count"] for r in recorded["summary"] if r["kind"] == "canary"} == {1, 4, 16, 64}


def test_heavily_duplicated_canaries_are_copied(figures):
    assert _row(figures, "canary", 64)["copy_share"] >= 0.75
    assert _row(figures, "canary", 16)["copy_share"] >= 0.5


def test_single_canaries_mostly_not(figures):
    assert _row(figures, "canary", 1)["copy_share"] <= 0.5
    assert _row(figures, "canary", 64)["copy_share"] > _row(figures, "canary", 1)["copy_share"]


def test_ordinary_prompts_give_novel_images(figures):
    for kind in ("ordinary", "heldout"):
        row = _row(figures, kind, 1 if kind == "ordinary" else 0)
        # no closer to the training set than real images that were never trained on
        assert row["median_nn_rmse"] >= 0.8 * figures["heldout_real_nn_rmse"]["median"]
