"""Run-dir formats read and written in one place: an embed run (FeatureStore) round-trips,
and a truncated or missing feature part is the same one-line DataError whichever stage
reads the run (index single/train/add, search against an index or streamed)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import diffmem
from diffmem.errors import DataError
from diffmem.features.store import FeatureStore
from diffmem.runs import INFO, mark_done, write_json


def _unit(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _store(run_dir, parts: list[np.ndarray]) -> FeatureStore:
    """A finished embed run written through the store, as the embed stage writes it."""
    store = FeatureStore(run_dir)
    for p, x in enumerate(parts):
        store.write_part(p, x)
    n = sum(len(x) for x in parts)
    store.write_ids(pd.DataFrame({"item_id": [f"i{i}" for i in range(n)], "file": [f"{i}.png" for i in range(n)]}))
    write_json(run_dir / INFO, {"feature": "pixel", "dim": parts[0].shape[1], "n": n})
    mark_done(run_dir, {"n": n})
    return store


def test_feature_store_round_trips(tmp_path):
    parts = [_unit(5, seed=0), _unit(3, seed=1)]
    store = _store(tmp_path / "emb", parts)
    assert [store.has_part(p) for p in range(3)] == [True, True, False]
    assert [p.name for p in store.part_paths()] == ["part-00000.npy", "part-00001.npy"]
    x, ids, info = store.load()
    assert x.dtype == np.float32 and np.array_equal(x, np.concatenate(parts))
    assert ids["item_id"].tolist() == [f"i{i}" for i in range(8)]
    assert info["feature"] == "pixel" and info["dim"] == 8 and store.info() == info
    maps, minfo = store.part_maps()
    assert minfo == info and [np.asarray(m).tolist() for m in maps] == [p.tolist() for p in parts]
    with pytest.raises(DataError, match="not a finished embed run"):
        FeatureStore(tmp_path / "nothing").load()


def _truncated(store: FeatureStore) -> list:
    part = store.part_path(1)
    part.write_bytes(part.read_bytes()[:100])
    return [part, "not a readable .npy"]


def _missing(store: FeatureStore) -> list:
    store.part_path(1).unlink()
    return [store.run_dir, "12 ids but 6 vectors"]


def _index(mode: str):
    def call(tmp, ref, good):
        args = [f"features_dir={ref}", f"run_dir={tmp / 'idx'}", f"build_dir={tmp / 'build'}", f"mode={mode}"]
        if mode == "add":  # the trained empty index of a good run of the same shape
            diffmem.run("index", [f"features_dir={good}", f"build_dir={tmp / 'trained'}", "mode=train"])
            (tmp / "build").mkdir()
            shutil.copy(tmp / "trained" / "empty.faiss", tmp / "build" / "empty.faiss")
        return diffmem.run("index", args)

    return call


def _search_queries(tmp, ref, good):
    idx = diffmem.run("index", [f"features_dir={good}", f"run_dir={tmp / 'good-idx'}"])
    return diffmem.run("search", [f"index_dir={idx}", f"queries_dir={ref}", f"run_dir={tmp / 'run'}"])


def _search_streamed(tmp, ref, good):
    return diffmem.run("search", [f"stream_dir={ref}", f"queries_dir={good}", f"run_dir={tmp / 'run'}"])


@pytest.mark.parametrize("spoil", [_truncated, _missing], ids=["truncated-part", "missing-part"])
@pytest.mark.parametrize(
    "read",
    [_index("single"), _index("train"), _index("add"), _search_queries, _search_streamed],
    ids=["index-single", "index-train", "index-add", "search-queries", "search-streamed"],
)
def test_bad_part_is_one_clear_error_on_every_read_path(tmp_path, spoil, read):
    good = _store(tmp_path / "good", [_unit(6, seed=2), _unit(6, seed=3)]).run_dir
    names = spoil(_store(tmp_path / "bad", [_unit(6, seed=0), _unit(6, seed=1)]))
    with pytest.raises(DataError) as err:
        read(tmp_path, tmp_path / "bad", good)
    msg = str(err.value)
    assert "\n" not in msg and all(str(n) in msg for n in names), msg
    assert not (tmp_path / "run").exists() and not (tmp_path / "idx").exists()
    assert not (tmp_path / "build" / "run.json").exists()


def test_content_digest_follows_the_contents_not_the_path(tmp_path):
    """Same contents: same digest; other vectors, ids or another part split under the same
    path: another digest (an index or search of the old contents is not reused)."""
    a = _store(tmp_path / "a", [_unit(6, seed=0), _unit(6, seed=1)]).content_digest()
    assert _store(tmp_path / "b", [_unit(6, seed=0), _unit(6, seed=1)]).content_digest() == a
    for i, parts in enumerate([[_unit(6, seed=0), _unit(6, seed=2)], [_unit(12, seed=0)]]):
        assert _store(tmp_path / f"c{i}", parts).content_digest() != a


def test_a_random_descriptor_is_named_in_every_output(tmp_path):
    """Vectors of a randomly initialised CLIP: the index's info and the search's info say so."""
    warning = "randomly initialised CLIP — not a meaningful descriptor"
    ref = _store(tmp_path / "ref", [_unit(6, seed=0)]).run_dir
    write_json(
        ref / INFO,
        {
            "feature": "clip",
            "dim": 8,
            "n": 6,
            "extractor": {"weights": {"path": None, "random_init": True, "warning": warning}},
        },
    )
    mark_done(ref, {"n": 6})
    assert FeatureStore(ref).warning() == warning
    idx = diffmem.run("index", [f"features_dir={ref}", f"run_dir={tmp_path / 'idx'}"])
    assert json.loads((idx / "index_info.json").read_text())["warning"] == warning
    out = diffmem.run("search", [f"index_dir={idx}", f"queries_dir={ref}", f"run_dir={tmp_path / 'run'}"])
    assert json.loads((out / "info.json").read_text())["warning"] == warning
    plain = _store(tmp_path / "plain", [_unit(6, seed=0)]).run_dir
    idx = diffmem.run("index", [f"features_dir={plain}", f"run_dir={tmp_path / 'idx2'}"])
    out = diffmem.run("search", [f"index_dir={idx}", f"queries_dir={plain}", f"run_dir={tmp_path / 'run2'}"])
    assert "warning" not in json.loads((idx / "index_info.json").read_text())
    assert "warning" not in json.loads((out / "info.json").read_text())
