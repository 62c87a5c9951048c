"""The search stage on index and embed runs: exact neighbours, streamed search, descriptor
mismatch, score normalisation (the index stage itself: test_index.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import diffmem
from diffmem.errors import ConfigError, DataError
from diffmem.features.store import FeatureStore
from tests.conftest import EMBED, SMALL_DATA


def test_search_equals_brute_force(ref_dir):
    q_dir = diffmem.run("embed", EMBED + ["split=heldout", "name=q"])
    idx = diffmem.run("index", [f"features_dir={ref_dir}"])
    out = diffmem.run("search", [f"index_dir={idx}", f"queries_dir={q_dir}", "k=3"])
    matches = pd.read_parquet(out / "matches.parquet")
    x, ids, _ = FeatureStore(ref_dir).load()
    q, qids, _ = FeatureStore(q_dir).load()
    sims = q @ x.T
    best = np.argsort(-sims, axis=1)[:, :3]
    got = matches.pivot(index="query_id", columns="rank", values="ref_id").loc[qids["item_id"]]
    assert (got.to_numpy() == ids["item_id"].to_numpy()[best]).mean() > 0.99  # ties aside
    top = matches[matches["rank"] == 0].set_index("query_id").loc[qids["item_id"], "score"]
    assert np.allclose(top.to_numpy(), sims.max(1), atol=1e-5)
    assert set(matches.columns) >= {"query_id", "rank", "ref_id", "score", "feature"}


def test_streamed_search_equals_the_index(ref_dir):
    """stream_dir: exact search part by part (memory-bounded), the same matches as a Flat index."""
    q_dir = diffmem.run("embed", EMBED + ["split=heldout", "name=q3"])
    idx = diffmem.run("index", [f"features_dir={ref_dir}"])
    a = pd.read_parquet(
        diffmem.run("search", [f"index_dir={idx}", f"queries_dir={q_dir}", "k=4", "name=a"]) / "matches.parquet"
    )
    b = pd.read_parquet(
        diffmem.run("search", [f"stream_dir={ref_dir}", f"queries_dir={q_dir}", "k=4", "name=b"]) / "matches.parquet"
    )
    assert len(list((ref_dir / "features").glob("part-*.npy"))) > 1  # really streamed in parts
    pd.testing.assert_frame_equal(
        a[["query_id", "rank", "ref_id", "ref_file"]], b[["query_id", "rank", "ref_id", "ref_file"]]
    )
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    with pytest.raises(ConfigError, match="exactly one of index_dir"):
        diffmem.run("search", [f"index_dir={idx}", f"stream_dir={ref_dir}", f"queries_dir={q_dir}"])


def test_other_descriptor_is_refused(ref_dir):
    idx = diffmem.run("index", [f"features_dir={ref_dir}"])
    q = diffmem.run(
        "embed",
        [
            *SMALL_DATA,
            "split=heldout",
            "features=clip",
            "features.extractor.arch=ViT-S-32",
            "features.extractor.pretrained=random",
            "features.extractor.device=cpu",
            "name=clipq",
        ],
    )
    assert FeatureStore(q).warning() == "randomly initialised CLIP — not a meaningful descriptor"
    with pytest.raises(DataError, match="dimension mismatch|built from 'pixel'"):
        diffmem.run("search", [f"index_dir={idx}", f"queries_dir={q}"])


def test_score_normalisation(ref_dir):
    q_dir = diffmem.run("embed", EMBED + ["split=heldout", "name=q2"])
    idx = diffmem.run("index", [f"features_dir={ref_dir}"])
    out = diffmem.run(
        "search",
        [
            f"index_dir={idx}",
            f"queries_dir={q_dir}",
            "k=2",
            f"normalisation.background_dir={q_dir}",
            "normalisation.k=2",
        ],
    )
    m = pd.read_parquet(out / "matches.parquet")
    q, _, _ = FeatureStore(q_dir).load()
    bg = np.sort(q @ q.T, axis=1)[:, ::-1][:, :2].mean(1)  # the queries are their own background
    top = m[m["rank"] == 0]
    assert np.allclose(top["score"].to_numpy(), top["raw_score"].to_numpy() - bg, atol=1e-5)
