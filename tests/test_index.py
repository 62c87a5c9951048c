"""Tests for diffmem.index: exactness, recall, sharded builds, persistence, bad input, and the
`diffmem index` stage."""

import json

import faiss
import numpy as np
import pytest

import diffmem
from diffmem.errors import ConfigError, DataError
from diffmem.features.store import FeatureStore
from diffmem.index import (
    add_shard,
    build_index,
    check_features,
    load_index,
    measure_recall,
    merge_shards,
    recall_at_k,
    save_index,
    search,
    streaming_search,
    train_empty_index,
)


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _random(n, d, seed):
    return _unit(np.random.default_rng(seed).standard_normal((n, d)))


def _clustered(n, d, n_clusters, seed, noise=0.3):
    """Unit vectors drawn around random unit centres (noise norm ~ `noise`)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_clusters, d)))
    lab = rng.integers(0, n_clusters, n)
    return _unit(centres[lab] + noise / np.sqrt(d) * rng.standard_normal((n, d)))


def _topk_numpy(xb, xq, k):
    sim = xq @ xb.T
    ids = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, ids, axis=1), ids, sim


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny workloads: OpenMP barriers cost more than they save on a shared machine
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old)


# ---------------------------------------------------------------------------- exactness


def test_flat_search_equals_numpy_bruteforce():
    xb, xq, k = _random(3000, 64, 0), _random(57, 64, 1), 10
    index = build_index(xb, "Flat", metric="ip")
    scores, ids = search(index, xq, k, batch_size=20)  # several query batches
    ref_scores, ref_ids, sim = _topk_numpy(xb, xq, k)
    assert scores.shape == ids.shape == (57, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # ties may be ordered differently: every returned id must carry its returned score
    np.testing.assert_allclose(np.take_along_axis(sim, ids, axis=1), scores, atol=1e-5)
    assert (ids == ref_ids).mean() > 0.99
    assert len({tuple(r) for r in np.sort(ids, axis=1)}) == 57  # no degenerate output


def test_recall_at_k_definition():
    exact = np.array([[3, 9], [5, 1], [7, 2], [0, 4]])
    approx = np.array([[3, 8], [1, 5], [2, 6], [9, 9]])
    assert recall_at_k(approx, exact, k=1) == pytest.approx(0.25)  # only query 0
    assert recall_at_k(approx, exact, k=2) == pytest.approx(0.5)  # + query 1
    with pytest.raises(ConfigError, match="at least 3"):
        recall_at_k(approx, exact, k=3)


def test_ivf_recall_on_clustered_data():
    xb = _clustered(6000, 32, 64, seed=0)
    rng = np.random.default_rng(5)  # queries: perturbed database rows
    xq = _unit(xb[rng.choice(6000, 200, replace=False)] + 0.05 * rng.standard_normal((200, 32)))
    index = build_index(xb, "IVF64,Flat", train_sample=4000, seed=0, nprobe=16)
    rec = measure_recall(index, xb, xq, k=5)
    assert set(rec) >= {"recall@1", "recall@5", "k", "n_queries"}
    assert rec["n_queries"] == 200
    assert rec["recall@1"] >= 0.97
    assert rec["recall@5"] >= rec["recall@1"]
    # with a single probed list the index is measurably approximate: recall must drop
    build = build_index(xb, "IVF64,Flat", train_sample=4000, seed=0, nprobe=1)
    assert measure_recall(build, xb, xq)["recall@1"] < rec["recall@1"]


def test_hnsw_and_ivfpq_build_and_search():
    xb, xq = _random(1000, 32, 3), _random(20, 32, 4)
    hnsw = build_index(xb, "HNSW16", hnsw_ef_search=64)
    ivfpq = build_index(xb, "IVF8,PQ8x4", nprobe=8)
    for index in (hnsw, ivfpq):
        s, i = search(index, xq, 5)
        assert s.shape == (20, 5) and (i >= 0).all() and (np.diff(s, axis=1) <= 1e-6).all()
    assert measure_recall(hnsw, xb, xq)["recall@1"] >= 0.9


# ---------------------------------------------------------------------------- sharded build


@pytest.mark.parametrize("factory", ["IVF32,Flat", "Flat", "IVF16,PQ8x4"])
def test_sharded_build_equals_single_build(tmp_path, factory):
    xb = _clustered(4500, 32, 40, seed=1)
    xq = _random(40, 32, 2)
    ids = np.arange(4500, dtype=np.int64) * 3 + 100  # non-trivial global ids
    empty_path = tmp_path / "empty.faiss"
    empty = train_empty_index(xb, factory, "ip", seed=0, out_path=empty_path)
    assert empty.ntotal == 0 and empty.is_trained
    bounds = [0, 1000, 2600, 4500]  # 3 uneven shards
    shard_paths = []
    for j in range(3):
        p = tmp_path / f"shard{j}.faiss"
        sh = add_shard(empty_path, xb[bounds[j] : bounds[j + 1]], ids[bounds[j] : bounds[j + 1]], out_path=p)
        assert sh.ntotal == bounds[j + 1] - bounds[j]
        shard_paths.append(p)
    merged = merge_shards(shard_paths)
    single = build_index(xb, factory, "ip", seed=0, ids=ids)  # trains on all rows, like above
    assert merged.ntotal == single.ntotal == 4500
    nprobe = 8 if "IVF" in factory else None
    for ix in (merged, single):
        if nprobe:
            faiss.ParameterSpace().set_index_parameter(ix, "nprobe", nprobe)
    s_m, i_m = search(merged, xq, 10)
    s_s, i_s = search(single, xq, 10)
    np.testing.assert_array_equal(i_m, i_s)
    np.testing.assert_allclose(s_m, s_s, rtol=0, atol=1e-6)
    assert np.isin(i_m, ids).all()
    if factory == "Flat":  # exact: also equal to brute force mapped to global ids
        _, ref_ids, _ = _topk_numpy(xb, xq, 10)
        assert (ids[ref_ids] == i_m).mean() > 0.99


def test_sharded_ivf_on_disk_merge(tmp_path):
    xb = _clustered(3000, 32, 30, seed=4)
    xq = _random(30, 32, 5)
    ids = np.arange(3000, dtype=np.int64)
    train_empty_index(xb, "IVF16,Flat", out_path=tmp_path / "empty.faiss")
    paths = []
    for j, s in enumerate(range(0, 3000, 1000)):
        paths.append(tmp_path / f"s{j}.faiss")
        add_shard(tmp_path / "empty.faiss", xb[s : s + 1000], ids[s : s + 1000], out_path=paths[-1])
    merged = merge_shards(paths, empty_index_path=tmp_path / "empty.faiss", ivfdata_path=tmp_path / "merged.ivfdata")
    save_index(merged, tmp_path / "out", {"factory": "IVF16,Flat"})
    loaded, info = load_index(tmp_path / "out")
    single = build_index(xb, "IVF16,Flat")
    for ix in (loaded, single):
        faiss.ParameterSpace().set_index_parameter(ix, "nprobe", 4)
    assert (tmp_path / "merged.ivfdata").stat().st_size > 0
    np.testing.assert_array_equal(search(loaded, xq, 5)[1], search(single, xq, 5)[1])
    assert info["ntotal"] == 3000


def test_merge_rejects_mismatched_shards(tmp_path):
    a = add_shard(train_empty_index(_random(500, 16, 0), "Flat"), _random(10, 16, 1), np.arange(10))
    b = add_shard(train_empty_index(_random(500, 32, 0), "Flat"), _random(10, 32, 1), np.arange(10))
    with pytest.raises(DataError, match="does not match"):
        merge_shards([a, b])
    with pytest.raises(DataError, match="duplicate"):
        add_shard(train_empty_index(_random(500, 16, 0), "Flat"), _random(3, 16, 1), [1, 1, 2])


# ---------------------------------------------------------------------------- persistence


def test_save_load_roundtrip(tmp_path):
    xb = _clustered(3000, 32, 20, seed=6)
    xq = _random(25, 32, 7)
    index = build_index(xb, "IVF16,Flat", nprobe=6)
    rec = measure_recall(index, xb, xq, k=10)
    out = save_index(index, tmp_path / "idx", {"factory": "IVF16,Flat", "feature": "sscd_disc_mixup", "recall": rec})
    assert (out / "index.faiss").is_file()
    on_disk = json.loads((out / "index_info.json").read_text())
    assert on_disk["factory"] == "IVF16,Flat"
    assert on_disk["metric"] == "ip"
    assert on_disk["ntotal"] == 3000 and on_disk["dim"] == 32
    assert on_disk["feature"] == "sscd_disc_mixup"
    assert on_disk["nprobe"] == 6 and on_disk["nlist"] == 16
    assert on_disk["recall"]["recall@10"] == pytest.approx(rec["recall@10"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temp files left

    loaded, info = load_index(out)
    assert info == on_disk
    assert loaded.ntotal == 3000 and loaded.d == 32
    s0, i0 = search(index, xq, 5)
    s1, i1 = search(loaded, xq, 5, info=info, feature="sscd_disc_mixup")
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(s0, s1)
    loaded2, _ = load_index(out / "index.faiss")  # the file path works too
    assert loaded2.ntotal == 3000


def test_save_describes_index_without_caller_info(tmp_path):
    index = build_index(_random(300, 8, 0), "Flat", metric="l2")
    save_index(index, tmp_path, {})
    info = json.loads((tmp_path / "index_info.json").read_text())
    assert (info["factory"], info["metric"], info["ntotal"], info["dim"]) == ("Flat", "l2", 300, 8)


def test_load_missing_index_names_file(tmp_path):
    with pytest.raises(DataError, match=r"index file not found: .*nothere.*index\.faiss"):
        load_index(tmp_path / "nothere")


# ---------------------------------------------------------------------------- streaming search


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_streaming_search_equals_exact(tmp_path, metric):
    xb = _random(2500, 24, 8)
    if metric == "l2":
        xb = xb * np.random.default_rng(0).uniform(0.5, 2.0, (2500, 1)).astype(np.float32)
    xq = _random(33, 24, 9)
    bounds = [0, 1100, 1103, 2500]  # the middle shard holds fewer rows than k
    paths = []
    for j in range(3):
        paths.append(tmp_path / f"part-{j:05d}.npy")
        np.save(paths[-1], xb[bounds[j] : bounds[j + 1]])
    exact = build_index(xb, "Flat", metric=metric)
    s_ref, i_ref = exact.search(xq, 8)
    s, i = streaming_search(paths, xq, 8, metric=metric, chunk=256)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-4)
    assert (i == i_ref).mean() > 0.99
    assert i.max() >= 1103  # ids from the last shard are offset globally
    # arrays instead of files give the same result
    s2, i2 = streaming_search([xb[:1100], xb[1100:]], xq, 8, metric=metric, chunk=10_000)
    np.testing.assert_array_equal(i2, i)


# ---------------------------------------------------------------------------- bad input


def test_dimension_mismatch_message():
    index = build_index(_random(200, 64, 0), "Flat")
    with pytest.raises(DataError, match="index built with D=64, queries have D=32"):
        search(index, _random(5, 32, 1), 3)


def test_check_features_dimension_names_both():
    with pytest.raises(DataError, match="D=16.*D=8"):
        check_features(_random(4, 16, 0), dim=8)
    with pytest.raises(DataError, match="2-D"):
        check_features(np.ones(5, dtype=np.float32))


def test_nan_features_reports_row_count():
    x = _random(100, 16, 0)
    x[3, 0] = np.nan
    x[70, 5] = np.inf
    with pytest.raises(DataError, match="2 of 100 rows contain NaN"):
        build_index(x, "Flat")


def test_non_normalised_features():
    x = _random(100, 16, 0) * 2.0
    with pytest.raises(DataError, match=r"100 of 100 rows are not L2-normalised.*metric l2"):
        build_index(x, "Flat", metric="ip")
    # the l2 metric accepts them
    assert build_index(x, "Flat", metric="l2").ntotal == 100
    # inside tolerance passes, outside fails
    y = _random(10, 16, 1)
    check_features(y * (1 + 5e-4))
    with pytest.raises(DataError, match="1 of 10 rows"):
        check_features(np.vstack([y[:9], y[9:] * 1.01]))


def test_empty_training_set():
    with pytest.raises(DataError, match="empty"):
        train_empty_index(np.zeros((0, 32), dtype=np.float32), "IVF16,Flat")
    with pytest.raises(DataError, match="empty"):
        build_index(np.zeros((0, 32), dtype=np.float32), "Flat")


def test_wrong_feature_name():
    index = build_index(_random(50, 16, 0), "Flat")
    info = {"feature": "sscd_disc_mixup"}
    with pytest.raises(DataError, match="'clip_vit_b32'.*'sscd_disc_mixup'"):
        search(index, _random(3, 16, 1), 2, info=info, feature="clip_vit_b32")
    assert search(index, _random(3, 16, 1), 2, info=info, feature="sscd_disc_mixup")[1].shape == (3, 2)


def test_invalid_factory_and_training_size():
    x = _random(500, 16, 0)
    with pytest.raises(ConfigError, match="invalid FAISS factory string 'IVFx,Flat'"):
        build_index(x, "IVFx,Flat")
    with pytest.raises(ConfigError, match="nlist=1000.*500 training vectors"):
        build_index(x, "IVF1000,Flat")
    with pytest.warns(UserWarning, match="wants >= 1560"):
        build_index(x, "IVF40,Flat")
    with pytest.raises(ConfigError, match="not an IVF index"):
        build_index(x, "Flat", nprobe=4)
    with pytest.raises(ConfigError, match="unknown index metric"):
        build_index(x, "Flat", metric="cos2")


# ---------------------------------------------------------------------------- the index stage
# `diffmem index` on embed runs: sharded builds equal the single one, recall is recorded.


def test_sharded_index_equals_single(ref_dir):
    single = diffmem.run("index", [f"features_dir={ref_dir}", "name=single"])
    args = [f"features_dir={ref_dir}", "name=sharded", "num_shards=3"]
    diffmem.run("index", args + ["mode=train"])
    for i in range(3):
        diffmem.run("index", args + ["mode=add", f"shard={i}"])
    with pytest.raises(ConfigError, match="0 of 1 shards present; the shards there were built with num_shards=3"):
        diffmem.run("index", [f"features_dir={ref_dir}", "name=sharded", "mode=merge"])  # num_shards forgotten
    merged = diffmem.run("index", args + ["mode=merge", "threads=1"])  # like every stage, index takes threads
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
        diffmem.run(
            "index", [f"features_dir={ref_dir}", *ivf, "name=ivf-many", "num_shards=50", "mode=add", "shard=49"]
        )


def test_approximate_index_records_recall(ref_dir):
    run = diffmem.run(
        "index",
        [
            f"features_dir={ref_dir}",
            "index=ivf",
            "index.factory='IVF4,Flat'",
            "index.nprobe=4",
            "index.train_sample=null",
            "recall.queries=20",
        ],
    )
    _, info = load_index(run)
    assert info["recall"]["recall@1"] == 1.0  # nprobe = nlist: exhaustive


def test_on_disk_index_moves_with_its_folder_and_refuses_another_ivfdata(tmp_path):
    """The inverted-lists file beside the index is found by name after the folder moves; a
    different file in its place is refused before FAISS maps it (it would crash on access)."""
    import shutil

    xb = _clustered(2000, 16, 8, seed=1)
    xq = _random(10, 16, 2)
    folder = tmp_path / "idx"
    train_empty_index(xb, "IVF8,Flat", out_path=folder / "empty.faiss")
    paths = [folder / f"s{j}.faiss" for j in range(2)]
    for j, p in enumerate(paths):
        add_shard(
            folder / "empty.faiss", xb[j * 1000 : (j + 1) * 1000], np.arange(j * 1000, (j + 1) * 1000), out_path=p
        )
    merged = merge_shards(paths, empty_index_path=folder / "empty.faiss", ivfdata_path=folder / "index.ivfdata")
    save_index(merged, folder, {"factory": "IVF8,Flat"})
    want = search(load_index(folder)[0], xq, 5)[1]
    del merged
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    np.testing.assert_array_equal(search(load_index(moved)[0], xq, 5)[1], want)
    data = (moved / "index.ivfdata").read_bytes()
    (moved / "index.ivfdata").write_bytes(data[: len(data) // 2])  # e.g. a newer build's file
    with pytest.raises(DataError, match=r"index.ivfdata is not the inverted-lists file .* rebuild the index"):
        load_index(moved)
    (moved / "index.ivfdata").unlink()
    with pytest.raises(DataError, match=r"index.ivfdata: not found"):
        load_index(moved)


def test_k_above_the_index_size_is_one_log_line_not_a_warning(caplog):
    """An audit with fewer training images than ``k`` once printed a raw UserWarning with its
    source line; now one log line says how many neighbours are missing."""
    import warnings

    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_index(x, "Flat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores, ids = search(index, x, k=5)
    assert (ids[:, 3:] == -1).all() and (ids[:, :3] >= 0).all()
    assert "k=5 but the index holds 3 vectors" in caplog.text
