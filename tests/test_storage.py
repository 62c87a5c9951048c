"""Data as it is stored: manifest formats, img2dataset output, webdataset shards, decoding of
awkward files (EXIF rotation, CMYK, 16-bit, float, alpha, WebP, unicode names) and
``data.on_error``, the embed stage giving the same vectors and ``diffmem audit`` the same
verdicts whichever storage holds them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import diffmem
from diffmem.data import load_dataset, load_image
from diffmem.data.samples import SAMPLES
from diffmem.errors import DataError
from diffmem.features import build_extractor
from diffmem.features.loader import embed_images
from diffmem.features.store import FeatureStore

RNG = np.random.default_rng(0)
#: a non-symmetric smooth picture (a JPEG keeps it), so a rotation or a black image shows
PHOTO = np.stack([*np.meshgrid(np.linspace(0, 255, 24), np.linspace(0, 200, 16)), np.full((16, 24), 90.0)], -1).astype(
    np.uint8
)


def _jpeg_exif6(path, img):
    """Stored rotated, with EXIF orientation 6: displays as ``img``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif)


def _rgba(path, img):
    a = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    a[:4, :4, 3] = 0  # transparent corner: white
    Image.fromarray(a, "RGBA").save(path)


def _gray16(path, img):
    Image.fromarray(img[..., 0].astype(np.uint16) * 257).save(path)


def _float_tiff(path, img):
    Image.fromarray(img[..., 1].astype(np.float32) / 255.0, "F").save(path)


WRITERS = {  # name -> writer of an image as that kind of file
    "exif6.jpg": _jpeg_exif6,
    "alpha.png": _rgba,
    "cmyk.jpg": lambda p, img: Image.fromarray(img).convert("CMYK").save(p, "JPEG", quality=95),
    "gray16.png": _gray16,
    "float.tif": _float_tiff,
    "lossless.webp": lambda p, img: Image.fromarray(img).save(p, "WEBP", lossless=True),
    "café ünï 写真.png": lambda p, img: Image.fromarray(img).save(p),
    "big.png": lambda p, img: Image.fromarray(img).save(p),
    "broken.jpg": lambda p, img: p.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg"),
}
KEYS = [f"{i:09d}" for i in range(len(WRITERS))]
#: every image displays as (a form of) PHOTO, but the unicode one (flipped) and a random one
PHOTOS = {
    **dict.fromkeys(WRITERS, PHOTO),
    "café ünï 写真.png": PHOTO[::-1],
    "big.png": RNG.integers(0, 255, (40, 30, 3), dtype=np.uint8),
}


def _build_stores(base, images):
    """``images`` (file name -> picture) written by :data:`WRITERS` as a folder (+ every
    manifest format), img2dataset output (with one failed download) and two webdataset
    shards, with the same ids and captions; returns each storage's ``data`` settings."""
    folder, i2d, wds = base / "folder", base / "i2d", base / "wds"
    for d in (folder, i2d / "00000", wds):
        d.mkdir(parents=True)
    rows = []
    for key, (name, write) in zip(KEYS, WRITERS.items()):
        write(folder / name, images[name])
        rows.append({"image_id": key, "File": name, "Caption": f"a photo, {name}"})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(folder / "m.csv", index=False)
    manifest.to_csv(folder / "m.tsv", sep="\t", index=False)
    manifest.to_csv(folder / "m.txt", sep="\t", index=False)
    manifest.to_parquet(folder / "m.parquet")
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    # img2dataset (output_format=files): <shard>.parquet + <shard>/<key>.jpg, whatever the bytes
    table = [
        {"key": r["image_id"], "status": "success", "url": f"http://x/{r['File']}", "caption": r["Caption"]}
        for r in rows
    ] + [{"key": "999999999", "status": "failed_to_download", "url": "http://x/gone", "caption": "gone"}]
    pd.DataFrame(table).to_parquet(i2d / "00000.parquet")
    for r in rows:
        (i2d / "00000" / f"{r['image_id']}.jpg").write_bytes((folder / r["File"]).read_bytes())
    # webdataset: two shards, captions as .txt in one and .json in the other
    for s, chunk in enumerate((rows[:5], rows[5:])):
        with tarfile.open(wds / f"shard-{s:05d}.tar", "w") as tar:
            for r in chunk:
                ext = r["File"].rsplit(".", 1)[1]
                cap = r["Caption"] if s == 0 else json.dumps({"caption": r["Caption"]})
                for member, data in (
                    (f"{r['image_id']}.{ext}", (folder / r["File"]).read_bytes()),
                    (f"{r['image_id']}.{'txt' if s == 0 else 'json'}", cap.encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {
        "folder": {"kind": "folder", "root": str(folder), "manifest": "m.csv"},
        "img2dataset": {"kind": "img2dataset", "root": str(i2d)},
        "webdataset": {"kind": "webdataset", "root": str(wds)},
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The awkward files, each a form of PHOTO, in every storage."""
    return _build_stores(tmp_path_factory.mktemp("stores"), PHOTOS)


def _data(spec, **extra):
    return OmegaConf.create({"subset": None, "resolution": 32, "on_error": "fail", **spec, **extra})


@pytest.mark.parametrize("manifest", ["m.csv", "m.tsv", "m.txt", "m.jsonl", "m.parquet"])
def test_manifest_formats_with_capitalised_headers(stores, manifest):
    root, df = load_dataset(_data(stores["folder"], manifest=manifest))
    assert df["image_id"].tolist() == KEYS
    assert df["caption"].iloc[0] == "a photo, exif6.jpg" and df["file"].iloc[6] == "café ünï 写真.png"


def test_same_ids_and_pixels_in_every_storage(stores):
    loaded = {k: load_dataset(_data(spec)) for k, spec in stores.items()}
    ids = {k: df.set_index("image_id") for k, (_, df) in loaded.items()}
    assert all(list(df.index) == KEYS for df in ids.values())  # the failed download is left out
    assert loaded["img2dataset"][1].attrs["rows_not_success"] == 1
    for key in KEYS[:-1]:
        pix = [load_image(root / ids[k].loc[key, "file"]) for k, (root, _) in loaded.items()]
        assert all(np.array_equal(pix[0], p) for p in pix[1:]), key
        assert len({ids[k].loc[key, "caption"] for k in ids}) == 1


def test_awkward_files_decode_as_displayed(stores):
    root = load_dataset(_data(stores["folder"]))[0]
    close = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean() < 4  # noqa: E731
    exif = load_image(root / "exif6.jpg")
    assert exif.shape == PHOTO.shape and close(exif, PHOTO)  # upright, not as stored
    alpha = load_image(root / "alpha.png")
    assert (alpha[:4, :4] == 255).all() and np.array_equal(alpha[8:], PHOTO[8:])
    assert close(load_image(root / "cmyk.jpg"), PHOTO)
    assert np.array_equal(load_image(root / "gray16.png")[..., 0], PHOTO[..., 0])  # not clipped to white
    assert np.array_equal(load_image(root / "float.tif")[..., 0], PHOTO[..., 1])  # not near-black
    assert np.array_equal(load_image(root / "lossless.webp"), PHOTO)


def test_on_error_fail_names_the_file_in_one_line(stores):
    with pytest.raises(DataError) as err:
        diffmem.run(
            "embed", ["data=webdataset", f"data.root={stores['webdataset']['root']}", "features=pixel", "name=fail"]
        )
    msg = str(err.value)
    assert "\n" not in msg and "shard-00001.tar/000000008.jpg" in msg and "on_error=skip" in msg


def _embed(spec, name, *extra):
    args = [
        f"data={spec['kind']}",
        *[f"data.{k}={v}" for k, v in spec.items() if k != "kind"],
        "data.on_error=skip",
        "features=pixel",
        "features.extractor.size=8",
        "part_size=4",
        "batch_size=3",
        f"name={name}",
        *extra,
    ]
    return FeatureStore(diffmem.run("embed", args))


def test_embed_same_vectors_in_every_storage_and_skips_listed(stores):
    runs = {k: _embed(spec, k) for k, spec in stores.items()}
    runs["workers"] = _embed(stores["webdataset"], "workers", "num_workers=2")
    vecs = {}
    for k, store in runs.items():
        x, ids, info = store.load()
        assert ids.columns.tolist() == ["item_id", "file"] and "caption" in store.items()
        assert info["n"] == len(KEYS) - 1 and info["n_skipped"] == 1
        skipped = store.skipped()
        assert skipped["item_id"].tolist() == [KEYS[-1]] and "corrupt or unreadable" in skipped["error"][0]
        vecs[k] = pd.DataFrame(x, index=ids["item_id"])
    assert runs["img2dataset"].info()["n_not_success"] == 1
    for k in ("img2dataset", "webdataset", "workers"):
        assert np.array_equal(vecs["folder"].to_numpy(), vecs[k].loc[vecs["folder"].index].to_numpy()), k


def test_mixed_sizes_batch_by_resized_shape(stores):
    """12 images of 4 sizes: one forward call for the square pixel recipe (was one per size run),
    vectors equal to embedding each image alone; workers give the same."""
    root = load_dataset(_data(stores["folder"]))[0]
    files = []
    for i, shape in enumerate([(20, 30), (30, 20), (17, 17), (64, 48)] * 3):
        files.append(f"mix{i}.png")
        Image.fromarray(RNG.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(root / files[-1])
    ext = build_extractor({"name": "pixel", "size": 8})
    calls = []
    forward = ext._embed
    ext._embed = lambda x: calls.append(len(x)) or forward(x)
    ((_, x, _),) = embed_images(ext, root, files, [0], 100, batch_size=64)
    assert calls == [12]
    alone = torch.cat(
        [ext(torch.from_numpy(load_image(root / f)).permute(2, 0, 1)[None] / 255.0) for f in files]
    ).numpy()
    assert np.allclose(x, alone, atol=1e-6)
    ((_, y, _),) = embed_images(ext, root, files, [0], 100, batch_size=5, num_workers=2)
    assert np.array_equal(x, y)


def _smooth(seed):
    """A distinct smooth picture (a JPEG keeps it) shaped like PHOTO."""
    small = np.random.default_rng(seed).integers(0, 255, (3, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((24, 16), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def distinct_stores(tmp_path_factory):
    """The awkward files, each a different picture, in every storage and every manifest format."""
    spec = _build_stores(tmp_path_factory.mktemp("distinct"), {n: _smooth(i) for i, n in enumerate(WRITERS)})
    folder = spec.pop("folder")
    return {**{m: {**folder, "manifest": m} for m in ("m.csv", "m.tsv", "m.txt", "m.jsonl", "m.parquet")}, **spec}


EXIF_CAPTION = "a photo, exif6.jpg"


@pytest.fixture
def copies_the_exif_photo(distinct_stores, monkeypatch):
    """The model returns the EXIF photo as displayed (upright) for its caption: a verbatim copy
    that only a loader honouring EXIF orientation recognises. Returns the photo as stored."""
    from PIL import ImageOps

    import diffmem.generate

    path = f"{distinct_stores['m.csv']['root']}/exif6.jpg"
    shown = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    real = diffmem.generate.generate_images

    def generate_images(pipe, plan, run_dir, *, resolution, **kw):
        real(pipe, plan, run_dir, resolution=resolution, **kw)
        copy = shown.resize((resolution, resolution), Image.Resampling.BICUBIC)
        for file in plan.loc[plan["caption"] == EXIF_CAPTION, "file"]:
            copy.save(run_dir / file)

    monkeypatch.setattr(diffmem.generate, "generate_images", generate_images)
    return np.asarray(Image.open(path).convert("RGB"))


def _audit_args(tiny_pipe_dir, spec, name, *extra):
    return [
        "model=local",
        f"model.path={tiny_pipe_dir}",
        "model.num_inference_steps=2",
        f"data={spec['kind']}",
        *[f"data.{k}={v}" for k, v in spec.items() if k != "kind"],
        f"name={name}",
        *extra,
    ]


def _audit(*args):
    return diffmem.run("audit", _audit_args(*args))


def test_audit_gives_the_same_verdicts_in_every_storage(tiny_pipe_dir, distinct_stores, copies_the_exif_photo):
    """``diffmem audit`` with nothing but model/data (and on_error=skip for the corrupt file) on
    five manifest formats, img2dataset output and webdataset shards of the same images."""
    verdicts, metrics = {}, {}
    for kind, spec in distinct_stores.items():
        run_dir = _audit(tiny_pipe_dir, spec, kind.replace(".", "_"), "data.on_error=skip")
        res = diffmem.load_run(run_dir)
        prompts = res.table("prompts").set_index("caption").sort_index()
        gens = res.table("generations").sort_values("sample_id").reset_index(drop=True)
        verdicts[kind] = (
            prompts[["memorised", "max_score", "n_generations"]],
            gens[["sample_id", "caption", "top1_ref_id", "top1_score", "replicated"]],
        )
        metrics[kind] = (
            pd.json_normalize(
                {
                    k: res.metrics[k]
                    for k in (
                        "generations",
                        "prompts",
                        "replication_rate",
                        "flagged_prompt_share",
                        "dcr",
                        "max_score",
                        "reference_images_skipped",
                    )
                }
            )
            .iloc[0]
            .to_dict()
        )
        skipped = FeatureStore(run_dir / "embed-train").skipped()
        assert skipped["item_id"].tolist() == [KEYS[-1]], kind  # broken.jpg, listed
    first = next(iter(verdicts))
    for kind in verdicts:
        pd.testing.assert_frame_equal(verdicts[first][0], verdicts[kind][0], check_exact=False, rtol=1e-5)
        pd.testing.assert_frame_equal(verdicts[first][1], verdicts[kind][1], check_exact=False, rtol=1e-5)
        assert metrics[kind] == pytest.approx(metrics[first], rel=1e-5), kind
    prompts, gens = verdicts[first]
    assert prompts["memorised"][EXIF_CAPTION] and prompts["memorised"].sum() == 1  # only the copy
    exif = gens[gens["caption"] == EXIF_CAPTION]
    assert (exif["top1_ref_id"] == KEYS[0]).all() and (exif["top1_score"] > 0.99).all()
    assert metrics[first]["reference_images_skipped"] == 1 and metrics[first]["flagged_prompt_share"] == 1 / 9
    assert metrics[first]["dcr.n"] == 36

    # the test can fail: against the photo as a loader ignoring EXIF saw it (rotated), the
    # copy scores far below the threshold
    ext = build_extractor({"name": "pixel", "size": 32})
    embed = lambda a: ext(torch.from_numpy(np.array(a)).permute(2, 0, 1)[None] / 255.0)  # noqa: E731
    shown = load_image(f"{distinct_stores['m.csv']['root']}/exif6.jpg", 32)
    stored = np.asarray(Image.fromarray(copies_the_exif_photo).resize((32, 32), Image.Resampling.BICUBIC))
    assert float(embed(shown) @ embed(stored).T) < diffmem.compose("audit").threshold


@pytest.mark.parametrize("kind", ["m.csv", "img2dataset", "webdataset"])
def test_audit_stops_on_the_corrupt_file_in_one_line(tiny_pipe_dir, distinct_stores, kind):
    """The default ``data.on_error=fail``: one line naming the file and the way out. The image
    is found unreadable when the training set is embedded, after generation; the way out
    resumes the run (the generations are kept)."""
    with pytest.raises(DataError) as err:
        _audit(tiny_pipe_dir, distinct_stores[kind], "fail")
    msg = str(err.value)
    assert "\n" not in msg and "corrupt or unreadable" in msg and "on_error=skip" in msg
    assert msg.split(":")[0].endswith(("broken.jpg", "000000008.jpg"))
    samples = Path(
        diffmem.compose("audit", _audit_args(tiny_pipe_dir, distinct_stores[kind], "fail")).run_dir, "generate", SAMPLES
    )
    generated = samples.stat().st_mtime_ns
    res = diffmem.load_run(_audit(tiny_pipe_dir, distinct_stores[kind], "fail", "data.on_error=skip"))
    assert res.done and res.metrics["reference_images_skipped"] == 1
    assert samples.stat().st_mtime_ns == generated
