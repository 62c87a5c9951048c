"""``diffmem dedup``: near-duplicate groups, the deduplicated manifest, resume, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import diffmem
from diffmem.errors import ConfigError, DataError
from diffmem.index import dedup as dedup_lib
from diffmem.index.dedup import group_vectors, merge_components, pixel_hashes

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "coins", "camera")
EDITS = ("crop", "resize", "jpeg")


def _edit(img: Image.Image, how: str) -> Image.Image:
    w, h = img.size
    if how == "crop":  # the central 80 %
        return img.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    if how == "resize":
        return img.resize((w // 2, h // 2), Image.BICUBIC)
    return img  # jpeg: saved at quality 40 below


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Eight scikit-image photos (PNG, 256 px) and, of the first four, a crop, a half-size copy
    and a quality-40 JPEG; a captions.csv listing every file, the first photo twice."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i, name in enumerate(PHOTOS):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img.thumbnail((256, 256))
        img.save(root / f"{name}.png")
        rows.append((f"{name}.png", f"photo {name}", name))
        for how in EDITS if i < 4 else ():
            file = f"{name}_{how}.{'jpg' if how == 'jpeg' else 'png'}"
            _edit(img, how).save(root / file, **({"quality": 40} if how == "jpeg" else {}))
            rows.append((file, f"photo {name} {how}", name))
    rows.append(rows[0])  # a file listed twice
    pd.DataFrame(rows, columns=["file", "caption", "source"]).to_csv(root / "captions.csv", index=False)
    return root


def _args(root: Path, *extra: str) -> list[str]:
    return [
        "data=folder",
        f"data.root={root}",
        "data.manifest=captions.csv",
        "features=sscd_distilled",
        "threads=1",
        *extra,
    ]


@pytest.mark.slow
def test_edited_copies_group_with_their_originals(photo_folder):
    run_dir = diffmem.run("dedup", _args(photo_folder))
    groups = pd.read_parquet(run_dir / "groups.parquet")
    src = pd.read_csv(photo_folder / "captions.csv").drop_duplicates("file").set_index("file")["source"]
    by_file = groups.drop_duplicates("file").set_index("file")["group_id"]
    # every photo's copies in one group, and no two photos in one
    assert (by_file.groupby(src.reindex(by_file.index).to_numpy()).nunique() == 1).all()
    assert (src.groupby(by_file.reindex(src.index).to_numpy()).nunique() == 1).all()
    assert groups["group_id"].nunique() == len(PHOTOS)
    assert groups.groupby("group_id")["is_representative"].sum().eq(1).all()
    rep = groups[groups["is_representative"]]
    assert np.allclose(rep["score"], 1, atol=1e-5) and (groups["score"] >= 0.75 - 1e-6).all()
    assert groups.loc[groups["file"] == "astronaut.png", "group_size"].iloc[0] == 5  # 2 rows + 3 copies

    # the deduplicated manifest: one row per group, read back by data=folder
    from omegaconf import OmegaConf

    from diffmem.data import load_dataset

    data = OmegaConf.create(
        {
            "kind": "folder",
            "root": str(photo_folder),
            "manifest": str(run_dir / "dedup_manifest.parquet"),
            "on_error": "fail",
        }
    )
    root, manifest = load_dataset(data)
    assert len(manifest) == len(PHOTOS) and manifest["source"].is_unique
    assert set(manifest["file"]) <= set(groups["file"]) and "caption" in manifest
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert "group 0" in (run_dir / "report.html").read_text()

    # resume: a finished run is a no-op; a lost output is recomputed, the embed run kept
    stamp = (run_dir / "embed" / "features" / "part-00000.npy").stat().st_mtime_ns
    (run_dir / "_SUCCESS").unlink()
    (run_dir / "groups.parquet").unlink()
    assert diffmem.run("dedup", _args(photo_folder)) == run_dir
    assert pd.read_parquet(run_dir / "groups.parquet").equals(groups)
    assert (run_dir / "embed" / "features" / "part-00000.npy").stat().st_mtime_ns == stamp

    # an existing embed run gives the same groups
    again = diffmem.run("dedup", ["embed_dir=" + str(run_dir / "embed"), "name=from-embed", "threads=1"])
    assert pd.read_parquet(again / "groups.parquet").equals(groups)


def test_folder_without_manifest(photo_folder):
    """A bare folder of photos (no captions file): every image file is grouped; the
    deduplicated manifest lists one file per group, to caption before training on it."""
    import json

    run_dir = diffmem.run("dedup", ["data=folder", f"data.root={photo_folder}", "features=pixel", "threads=1"])
    groups = pd.read_parquet(run_dir / "groups.parquet")
    files = sorted(p.name for p in photo_folder.iterdir() if p.suffix in (".png", ".jpg"))
    assert sorted(groups["file"]) == files  # the folder's images, each once (no captions.csv rows)
    kept = pd.read_parquet(run_dir / "dedup_manifest.parquet")
    assert len(kept) == groups["group_id"].nunique() and kept["caption"].isna().all()
    assert json.loads((run_dir / "info.json").read_text())["use"].endswith("once it has a caption column")


def test_exact_hash_joins_pixel_identical_files(tmp_path):
    """A PNG and its lossless re-encoding (BMP) share a hash; a different picture does not."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2))
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(a).save(tmp_path / "a_copy.bmp")
    Image.fromarray(b).save(tmp_path / "b.png")
    pd.DataFrame({"file": ["a.png", "a_copy.bmp", "b.png"], "caption": ["x", "y", "z"]}).to_csv(
        tmp_path / "captions.csv", index=False
    )
    # pixel descriptor, threshold 1: only the hash can join a and its copy (cosine 1 up to rounding)
    args = [
        "data=folder",
        f"data.root={tmp_path}",
        "data.manifest=captions.csv",
        "features=pixel",
        "features.extractor.size=8",
        "threshold=1.0",
    ]
    groups = pd.read_parquet(diffmem.run("dedup", args) / "groups.parquet").set_index("file")
    assert groups.loc["a.png", "group_id"] == groups.loc["a_copy.bmp", "group_id"] != groups.loc["b.png", "group_id"]
    assert groups.loc["a_copy.bmp", "exact"] and groups["group_size"].tolist().count(2) == 2


def test_pixel_hashes_decode_only_images_of_shared_sizes(tmp_path, monkeypatch):
    """Only images whose size (either orientation) another image has are decoded and hashed;
    an image of a size of its own gets None, a class of its own in the groups."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2))
    c, e = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pictures = {"a.png": a, "a.bmp": a, "b.png": b, "c.png": c, "c_t.png": c.transpose(1, 0, 2), "e.png": e}
    for file, arr in pictures.items():
        Image.fromarray(arr).save(tmp_path / file)
    decoded = []
    real = dedup_lib.load_image
    monkeypatch.setattr(dedup_lib, "load_image", lambda path, **kw: decoded.append(Path(path).name) or real(path, **kw))
    h = dict(zip(pictures, pixel_hashes(tmp_path, list(pictures))))
    assert decoded == ["a.png", "a.bmp", "b.png", "c.png", "c_t.png"]
    assert h["a.png"] == h["a.bmp"] != h["b.png"] and None not in (h["c.png"], h["c_t.png"])
    assert h["c.png"] != h["c_t.png"] and h["e.png"] is None
    # digests are asked for the rows with a neighbour at cosine >= 0.99 only; a shared digest
    # joins rows whatever the threshold, a missing one (None) joins nothing
    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 2, 3]]
    x[1, 3] = x[3, 3] = x[5, 3] = 0.1  # rows 1, 3, 5 at cosine 0.995 to rows 0, 2, 4
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    asked = []
    digests = {0: "h", 1: "h", 2: "g", 3: None, 4: "f", 5: "f2"}
    df = group_vectors(x, 0.999, lambda rows: asked.extend(rows) or [digests[r] for r in rows])
    assert sorted(asked) == [0, 1, 2, 3, 4, 5]
    assert df["group"].tolist() == [0, 0, 1, 2, 3, 4, 5] and df["exact"].all()
    df = group_vectors(x, 0.9, lambda rows: [digests[r] for r in rows])  # near pairs, one of them exact
    assert df["group"].tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert df["exact"][:2].all() and df["exact"][2:6].sum() == 2 and df["exact"][6]


def test_components_and_representatives():
    """Chains join transitively; the central member represents its group."""
    labels = merge_components(np.arange(6), np.array([0, 3]), np.array([2, 2]))
    assert labels.tolist() == [0, 1, 0, 0, 4, 5]
    # random pairs merged batch by batch: scipy's components, each labelled by its lowest row
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    n, a, b = 2000, rng.integers(0, 2000, 1500), rng.integers(0, 2000, 1500)
    labels = np.arange(n)
    for s in range(0, len(a), 100):
        labels = merge_components(labels, a[s : s + 100], b[s : s + 100])
    comp = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)[1]
    lowest = pd.Series(np.arange(n)).groupby(comp).transform("min").to_numpy()
    assert np.array_equal(labels, lowest) and len(np.unique(labels)) < n - 1000
    x = np.eye(4, dtype=np.float32)[[0, 0, 0, 1]] + np.array(
        [[0, 0.3, 0, 0], [0, 0, 0.3, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    df = group_vectors(x, 0.9)
    assert df["group"].tolist() == [0, 0, 0, 1] and df["representative"].tolist() == [2, 2, 2, 3]
    assert df["size"].tolist() == [3, 3, 3, 1] and df.loc[2, "score"] == pytest.approx(1)
    assert group_vectors(x, 0.9, representative="first")["representative"].tolist() == [0, 0, 0, 3]


def test_bad_inputs_are_one_line_errors_before_any_work(tmp_path):
    (tmp_path / "empty.csv").write_text("file,caption\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    pd.DataFrame({"file": ["ok.png", "bad.png"], "caption": ["a", "b"]}).to_csv(tmp_path / "bad.csv", index=False)
    base = ["data=folder", f"data.root={tmp_path}", "features=pixel", "name=x"]
    with pytest.raises(DataError, match="the manifest has no rows"):
        diffmem.run("dedup", base + ["data.manifest=empty.csv"])
    with pytest.raises(DataError, match="bad.png: corrupt or unreadable image"):
        diffmem.run("dedup", base + ["data.manifest=bad.csv"])
    for t in ("1.5", "-2"):
        with pytest.raises(ConfigError, match="threshold"):
            diffmem.run("dedup", base + ["data.manifest=bad.csv", f"threshold={t}"])
    out = Path(diffmem.compose("dedup", base + ["data.manifest=bad.csv"]).run_dir)
    assert not out.exists()  # nothing claimed


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty.csv").write_text("file,caption\n")
    for extra in (["data.manifest=empty.csv"], ["data.manifest=empty.csv", "threshold=1.5"]):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "diffmem.cli",
                "dedup",
                "data=folder",
                f"data.root={tmp_path}",
                "features=pixel",
                f"hydra.run.dir={tmp_path}/out",
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
        assert res.stderr.startswith("diffmem dedup: error:")
        assert not (tmp_path / "out").exists()  # Hydra's run dir of the refused command is gone


def _bench(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_mitigation_benchmark_measures_a_model(tmp_path):
    """``bench_dedup_mitigation.py`` (the retrained-on-dedup comparison) runs on the shipped
    testbed: copy shares per canary tier, written where asked."""
    bench = _bench("bench_dedup_mitigation")
    model = Path(__file__).resolve().parents[1] / "diffmem" / "assets" / "testbed"
    argv = [
        "--model",
        str(model),
        "--n-seeds",
        "1",
        "--steps",
        "2",
        "--canaries-only",
        "--out",
        str(tmp_path / "m.json"),
    ]
    rows = bench.main(bench.parse_args(argv))[str(model)]
    assert {(r["kind"], r["dup_count"]) for r in rows} == {("canary", d) for d in (1, 4, 16, 64)} | {("template", 32)}
    assert all(0 <= r["copy_share"] <= 1 for r in rows) and (tmp_path / "m.json").exists()


def test_planted_clusters_recovered_exact_and_ivf():
    """The scale benchmark's planted clusters (2-8 members at cosine 0.82-0.94 to their centre,
    among random vectors) come back exactly, by exact and by IVF range search."""
    bench = _bench("bench_dedup_groups")
    base = {"n": 3000, "dim": 64, "cluster_share": 0.2, "threshold": 0.75, "threads": 1, "seed": 0}
    n_planted = int((bench.planted(3000, 64, 0.2, 0)[1] >= 0).sum())
    exact = bench.one({**base, "factory": "Flat"})
    assert exact["planted_clusters"] == 120 and exact["groups"] == 3000 - n_planted + 120
    assert exact["clusters_recovered"] == exact["pair_recall"] == exact["pair_precision"] == 1.0
    ivf = bench.one({**base, "factory": "IVF16,Flat", "nprobe": 4, "train_sample": 3000})
    assert ivf["clusters_recovered"] >= 0.95 and ivf["pair_recall"] >= 0.95 and ivf["pair_precision"] == 1.0
