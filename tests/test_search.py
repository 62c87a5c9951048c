"""The index and search stages chained on embed runs: exact neighbours, sharded builds,
descriptor mismatch, score normalisation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import diffmem
from diffmem.errors import ConfigError, DataError
from diffmem.features.store import FeatureStore
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
    a = pd.read_parquet(diffmem.run("search", [f"index_dir={idx}", f"queries_dir={q_dir}", "k=4", "name=a"])
                        / "matches.parquet")
    b = pd.read_parquet(diffmem.run("search", [f"stream_dir={ref_dir}", f"queries_dir={q_dir}", "k=4", "name=b"])
                        / "matches.parquet")
    assert len(list((ref_dir / "features").glob("part-*.npy"))) > 1  # really streamed in parts
    pd.testing.assert_frame_equal(a[["query_id", "rank", "ref_id", "ref_file"]], b[["query_id", "rank", "ref_id", "ref_file"]])
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    with pytest.raises(ConfigError, match="exactly one of index_dir"):
        diffmem.run("search", [f"index_dir={idx}", f"stream_dir={ref_dir}", f"queries_dir={q_dir}"])


def test_sharded_index_equals_single(ref_dir):
    single = diffmem.run("index", [f"features_dir={ref_dir}", "name=single"])
    args = [f"features_dir={ref_dir}", "name=sharded", "num_shards=3"]
    diffmem.run("index", args + ["mode=train"])
    for i in range(3):
        diffmem.run("index", args + ["mode=add", f"shard={i}"])
    merged = diffmem.run("index", args + ["mode=merge"])
    x, _, _ = FeatureStore(ref_dir).load()
    a, _ = load_index(single)
    b, info = load_index(merged)
    assert b.ntotal == a.ntotal == len(x) and info["feature"] == "pixel"
    da, ia = a.search(x[:10], 5)
    db, ib = b.search(x[:10], 5)
    assert np.array_equal(ia, ib) and np.allclose(da, db)


@pytest.mark.parametrize("ondisk", [False, True])
def test_sharded_ivf_from_separate_job_dirs_equals_single(ref_dir, tmp_path, ondisk):
    """IVF trained on the same rows in both builds; adds run from their own (multirun) job dirs
    yet meet in build_dir; the merged index keeps nprobe; on disk or in memory."""
    ivf = ["index=ivf", "index.factory='IVF4,Flat'", "index.nprobe=2", "index.train_sample=20"]
    single = diffmem.run("index", [f"features_dir={ref_dir}", *ivf, "name=ivf-single", "recall.queries=0"])
    args = [f"features_dir={ref_dir}", *ivf, f"name=ivf-sharded-{ondisk}", "num_shards=2"]
    diffmem.run("index", args + ["mode=train"])
    for i in range(2):
        diffmem.run("index", args + ["mode=add", f"shard={i}", f"run_dir={tmp_path}/job-{i}"])
    merged = diffmem.run("index", args + ["mode=merge", f"ondisk={ondisk}"])
    assert (merged / "index.ivfdata").exists() == ondisk and not (tmp_path / "job-0" / "shards").exists()
    x, _, _ = FeatureStore(ref_dir).load()
    a, _ = load_index(single)
    b, info = load_index(merged)
    assert info["nprobe"] == 2
    da, ia = a.search(x, 5)
    db, ib = b.search(x, 5)
    assert np.array_equal(ia, ib) and np.allclose(da, db, atol=1e-6)
    with pytest.raises(ConfigError, match="fewer than num_shards=50"):
        diffmem.run("index", [f"features_dir={ref_dir}", *ivf, "name=ivf-many", "num_shards=50", "mode=add",
                              "shard=49"])


def test_approximate_index_records_recall(ref_dir):
    run = diffmem.run("index", [f"features_dir={ref_dir}", "index=ivf", "index.factory='IVF4,Flat'",
                                "index.nprobe=4", "index.train_sample=null", "recall.queries=20"])
    _, info = load_index(run)
    assert info["recall"]["recall@1"] == 1.0  # nprobe = nlist: exhaustive


def test_other_descriptor_is_refused(ref_dir):
    idx = diffmem.run("index", [f"features_dir={ref_dir}"])
    q = diffmem.run("embed", [*SMALL_DATA, "split=heldout", "features=clip", "features.extractor.arch=ViT-S-32",
                              "features.extractor.pretrained=random",
                              "features.extractor.device=cpu", "name=clipq"])
    assert FeatureStore(q).warning() == "randomly initialised CLIP — not a meaningful descriptor"
    with pytest.raises(DataError, match="dimension mismatch|built from 'pixel'"):
        diffmem.run("search", [f"index_dir={idx}", f"queries_dir={q}"])


def test_score_normalisation(ref_dir):
    q_dir = diffmem.run("embed", EMBED + ["split=heldout", "name=q2"])
    idx = diffmem.run("index", [f"features_dir={ref_dir}"])
    out = diffmem.run("search", [f"index_dir={idx}", f"queries_dir={q_dir}", "k=2",
                                 f"normalisation.background_dir={q_dir}", "normalisation.k=2"])
    m = pd.read_parquet(out / "matches.parquet")
    q, _, _ = FeatureStore(q_dir).load()
    bg = np.sort(q @ q.T, axis=1)[:, ::-1][:, :2].mean(1)  # the queries are their own background
    top = m[m["rank"] == 0]
    assert np.allclose(top["score"].to_numpy(), top["raw_score"].to_numpy() - bg, atol=1e-5)
