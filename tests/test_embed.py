"""The embed stage: vectors for a dataset or a generate run, resumable and shardable."""

from __future__ import annotations

import numpy as np
import pytest

import diffmem
from diffmem.errors import ConfigError, DataError
from diffmem.features.store import FeatureStore
from tests.conftest import SMALL_DATA

ARGS = [*SMALL_DATA, "features.extractor.size=8", "part_size=5", "batch_size=4"]


def test_embed_dataset_parts_and_info():
    run_dir = diffmem.run("embed", ARGS + ["split=train"])
    x, ids, info = FeatureStore(run_dir).load()
    assert x.shape == (len(ids), 192) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert ids["file"].is_unique  # duplicated canaries are embedded once
    assert info["feature"] == "pixel" and info["extractor"]["preprocessing"]["size"] == 8
    assert len(list((run_dir / "features").glob("part-*.npy"))) == -(-len(ids) // 5)


def test_resume_after_kill_recomputes_only_missing_parts():
    run_dir = diffmem.run("embed", ARGS)
    parts = sorted((run_dir / "features").glob("part-*.npy"))
    before = {p.name: p.read_bytes() for p in parts}
    keep_stamp = parts[0].stat().st_mtime_ns
    parts[-1].unlink()
    (run_dir / "_SUCCESS").unlink()
    diffmem.run("embed", ARGS)
    after = {p.name: p.read_bytes() for p in sorted((run_dir / "features").glob("part-*.npy"))}
    assert after == before and parts[0].stat().st_mtime_ns == keep_stamp


def test_shards_equal_single_run():
    single, _, _ = FeatureStore(diffmem.run("embed", ARGS + ["name=one"])).load()
    args = ARGS + ["name=two", "num_shards=2"]
    first = diffmem.run("embed", args + ["shard=0"])
    assert not (first / "_SUCCESS").exists()
    diffmem.run("embed", args + ["shard=1"])
    sharded, _, _ = FeatureStore(first).load()
    assert np.array_equal(single, sharded)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="source=samples needs samples_dir"):
        diffmem.run("embed", ARGS + ["source=samples"])
    with pytest.raises(DataError, match="samples.parquet: not found"):
        diffmem.run("embed", ARGS + ["source=samples", "samples_dir=/nonexistent"])
    with pytest.raises(ConfigError, match="part_size must be >= 1"):
        diffmem.run("embed", ARGS + ["part_size=0"])
    with pytest.raises(DataError, match="not a finished embed run"):
        FeatureStore("/nonexistent").load()


def test_changed_item_list_is_refused_on_resume(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("file,caption\n0.png,a\n1.png,b\n2.png,c\n")
    args = ["data=folder", f"data.root={tmp_path}", "data.manifest=m.csv", "data.resolution=8",
            "features.extractor.size=8", "part_size=2"]
    run_dir = diffmem.run("embed", args)
    (run_dir / "_SUCCESS").unlink()
    (tmp_path / "m.csv").write_text("file,caption\n0.png,a\n2.png,c\n")  # a row deleted
    with pytest.raises(ConfigError, match="the item list changed since this run started"):
        diffmem.run("embed", args)
