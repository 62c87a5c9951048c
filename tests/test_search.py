"""The index and search stages chained on embed runs: exact neighbours, sharded builds,
descriptor mismatch, score normalisation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import diffmem
from diffmem.embed import load_features
from diffmem.errors import DataError
from diffmem.index import load_index
from tests.conftest import SMALL_DATA

EMBED = [*SMALL_DATA, "features.extractor.size=8", "part_size=7"]


@pytest.fixture
def ref_dir():
    return diffmem.run("embed", EMBED + ["split=train", "name=ref"])


def test_search_equals_brute_force(ref_dir):
    q_dir = diffmem.run("embed", EMBED + ["split=heldout", "name=q"])
    idx = diffmem.run("index", [f"features_dir={ref_dir}"])
    out = diffmem.run("search", [f"index_dir={idx}", f"queries_dir={q_dir}", "k=3"])
    matches = pd.read_parquet(out / "matches.parquet")
    x, ids, _ = load_features(ref_dir)
    q, qids, _ = load_features(q_dir)
    sims = q @ x.T
    best = np.argsort(-sims, axis=1)[:, :3]
    got = matches.pivot(index="query_id", columns="rank", values="ref_id").loc[qids["item_id"]]
    assert (got.to_numpy() == ids["item_id"].to_numpy()[best]).mean() > 0.99  # ties aside
    top = matches[matches["rank"] == 0].set_index("query_id").loc[qids["item_id"], "score"]
    assert np.allclose(top.to_numpy(), sims.max(1), atol=1e-5)
    assert set(matches.columns) >= {"query_id", "rank", "ref_id", "score", "feature"}


def test_sharded_index_equals_single(ref_dir):
    single = diffmem.run("index", [f"features_dir={ref_dir}", "name=single"])
    args = [f"features_dir={ref_dir}", "name=sharded", "num_shards=3"]
    diffmem.run("index", args + ["mode=train"])
    for i in range(3):
        diffmem.run("index", args + ["mode=add", f"shard={i}"])
    merged = diffmem.run("index", args + ["mode=merge"])
    x, _, _ = load_features(ref_dir)
    a, _ = load_index(single)
    b, info = load_index(merged)
    assert b.ntotal == a.ntotal == len(x) and info["feature"] == "pixel"
    da, ia = a.search(x[:10], 5)
    db, ib = b.search(x[:10], 5)
    assert np.array_equal(ia, ib) and np.allclose(da, db)


def test_approximate_index_records_recall(ref_dir):
    run = diffmem.run("index", [f"features_dir={ref_dir}", "index=ivf", "index.factory='IVF4,Flat'",
                                "index.nprobe=4", "index.train_sample=null", "recall.queries=20"])
    _, info = load_index(run)
    assert info["recall"]["recall@1"] == 1.0  # nprobe = nlist: exhaustive


def test_other_descriptor_is_refused(ref_dir):
    idx = diffmem.run("index", [f"features_dir={ref_dir}"])
    q = diffmem.run("embed", [*SMALL_DATA, "split=heldout", "features=clip", "features.extractor.arch=ViT-S-32",
                              "features.extractor.device=cpu", "name=clipq"])
    with pytest.raises(DataError, match="dimension mismatch|built from 'pixel'"):
        diffmem.run("search", [f"index_dir={idx}", f"queries_dir={q}"])


def test_score_normalisation(ref_dir):
    q_dir = diffmem.run("embed", EMBED + ["split=heldout", "name=q2"])
    idx = diffmem.run("index", [f"features_dir={ref_dir}"])
    out = diffmem.run("search", [f"index_dir={idx}", f"queries_dir={q_dir}", "k=2",
                                 f"normalisation.background_dir={q_dir}", "normalisation.k=2"])
    m = pd.read_parquet(out / "matches.parquet")
    q, _, _ = load_features(q_dir)
    bg = np.sort(q @ q.T, axis=1)[:, ::-1][:, :2].mean(1)  # the queries are their own background
    top = m[m["rank"] == 0]
    assert np.allclose(top["score"].to_numpy(), top["raw_score"].to_numpy() - bg, atol=1e-5)
