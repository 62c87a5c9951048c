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
    args = [
        "data=folder",
        f"data.root={tmp_path}",
        "data.manifest=m.csv",
        "data.resolution=8",
        "features.extractor.size=8",
        "part_size=2",
    ]
    run_dir = diffmem.run("embed", args)
    (run_dir / "_SUCCESS").unlink()
    (tmp_path / "m.csv").write_text("file,caption\n0.png,a\n2.png,c\n")  # a row deleted
    with pytest.raises(ConfigError, match="the item list changed since this run started"):
        diffmem.run("embed", args)


# -- the uint8 fast path of the ONNX descriptors ------------------------------------------------


@pytest.fixture(scope="module")
def camera_jpegs(tmp_path_factory):
    """scikit-image's and matplotlib's photos up-scaled to camera sizes (long side 1200-1980 px)
    as JPEGs, the first stored sideways with EXIF orientation 6 (displayed upright); and 4
    1024 x 768 mosaics of 4 photos each at their own detail (textures: grass, gravel, brick,
    the Hubble deep field), where resampling shows most."""
    from PIL import Image

    from diffmem.data.photos import OTHER_PHOTOS, PHOTOS, natural_photos

    root = tmp_path_factory.mktemp("camera")
    files = []
    for k, (name, arr) in enumerate(natural_photos(PHOTOS + OTHER_PHOTOS, max_side=4096).items()):
        im = Image.fromarray(arr)
        s = (1200 + 40 * k) / max(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BICUBIC)
        files.append(f"{name}.jpg")
        if k == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
            im.transpose(Image.Transpose.ROTATE_90).save(root / files[-1], quality=90, exif=exif)
        else:
            im.save(root / files[-1], quality=90)
    tiles = [
        np.asarray(Image.fromarray(arr).resize((512, 384), Image.Resampling.BILINEAR))
        for arr in natural_photos(("grass", "gravel", "brick", "hubble_deep_field", "coffee", "chelsea")).values()
    ]
    for k in range(4):
        t = [tiles[(k + j) % len(tiles)] for j in range(4)]
        files.append(f"mosaic{k}.jpg")
        mosaic = np.concatenate([np.concatenate(t[:2], 1), np.concatenate(t[2:], 1)])
        Image.fromarray(mosaic).save(root / files[-1], quality=90)
    return root, files


@pytest.fixture(scope="module")
def distilled():
    from diffmem.features import build_extractor

    return build_extractor("sscd_distilled", threads=1)


def _float_path(ext, path):
    """The per-image float path: full decode, torch resize, the extractor's own call."""
    import torch

    from diffmem.data import load_image

    return ext(torch.from_numpy(load_image(path)).permute(2, 0, 1)[None].float() / 255.0).numpy()[0]


@pytest.mark.parametrize("resize", ["short", "square", "long"])
def test_draft_decode_gives_the_recipes_size(camera_jpegs, resize, monkeypatch):
    """JPEGs decode at reduced size (>= DRAFT_MARGIN x the target), then resize to exactly the
    size the full picture gives, EXIF orientation included."""
    from PIL import Image, JpegImagePlugin

    from diffmem.data.decode import DRAFT_MARGIN
    from diffmem.features.loader import decode_uint8
    from diffmem.features.transforms import Preprocess

    root, files = camera_jpegs
    pre = Preprocess(resize=resize, size=288)
    drafts = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(im, mode, size):
        full = im.size
        out = draft(im, mode, size)
        drafts.append((size, full, im.size))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for f in files:
        with Image.open(root / f) as im:
            w, h = im.size  # as stored
            turned = im.getexif().get(0x0112, 1) == 6
        x = decode_uint8(root / f, pre)
        assert x.dtype == np.uint8 and x.shape == (*pre.output_size(*((w, h) if turned else (h, w))), 3), f
        ((asked, _, got),) = drafts[-1:]
        th, tw = pre.resize_size(h, w)
        assert asked == (tw * DRAFT_MARGIN, th * DRAFT_MARGIN), f
        assert got[0] >= asked[0] and got[1] >= asked[1], f  # never below DRAFT_MARGIN x the target
    assert len(drafts) == len(files)
    assert sum(got[0] <= full[0] // 2 for _, full, got in drafts) >= len(files) // 2  # most decode at <= 1/2


def test_fast_path_matches_the_per_image_float_path(camera_jpegs, distilled):
    """The stage's uint8 path (draft decode, PIL resize, batched) against the float path run
    on each image alone: cosine >= 0.995 on every photo (measured: >= 0.998)."""
    from diffmem.features.loader import embed_images

    root, files = camera_jpegs
    ((_, fast, _),) = embed_images(distilled, root, files, [0], 100, batch_size=64)
    ref = np.stack([_float_path(distilled, root / f) for f in files])
    cos = (fast * ref).sum(1)
    assert cos.min() >= 0.995, dict(zip(files, cos.round(4)))
    assert np.allclose(np.linalg.norm(fast, axis=1), 1, atol=1e-5)


def test_fast_path_keeps_the_copy_detection_auc(tmp_path, distilled):
    """A copy set written to files and embedded by the stage's path scores the AUC the float
    path does (within 0.005, and above the descriptor's bar)."""
    from PIL import Image

    from diffmem.data.photos import PHOTOS, natural_photos
    from diffmem.features.copyset import build_copy_set, score_copy_set
    from diffmem.features.loader import embed_images
    from diffmem.metrics.detection import detection_metrics

    cs = build_copy_set(
        natural_photos(PHOTOS[:10], max_side=256), families=("crop", "resize_jpeg", "blur", "rotate"), seed=0
    )
    files = []
    for kind, arrays in (("o", cs.originals), ("c", cs.copies)):
        for i, a in enumerate(arrays):
            files.append(f"{kind}{i}.png")
            Image.fromarray(a).save(tmp_path / files[-1])
    ((_, x, _),) = embed_images(distilled, tmp_path, files, [0], 1000, batch_size=16)
    a, b = x[: len(cs.originals)], x[len(cs.originals) :]
    fast = detection_metrics((a @ b.T).ravel(), cs.labels().ravel(), thresholds=[0.75])["roc_auc"]
    ref = detection_metrics(*score_copy_set(distilled, cs))["roc_auc"]
    assert fast >= 0.99 and abs(fast - ref) <= 0.005, (fast, ref)


def test_mixed_shapes_batch_and_equal_one_at_a_time(camera_jpegs, distilled, monkeypatch, tmp_path):
    """Images of one resized shape share an ONNX call (at most UINT8_BATCH); the vectors equal
    those of each image run alone, decoded in the main thread or in 2 threads."""
    import shutil

    from diffmem.features.loader import UINT8_BATCH, decode_uint8, embed_images

    root, files = camera_jpegs
    files = files[:6]
    for f in files[:3]:  # the same pictures again: 3 shapes with 2 images each at least
        shutil.copy(root / f, tmp_path / f"again_{f}")
        shutil.copy(root / f, tmp_path / f)
    for f in files[3:]:
        shutil.copy(root / f, tmp_path / f)
    files = files + [f"again_{f}" for f in files[:3]]
    calls = []
    run = distilled._run
    monkeypatch.setattr(distilled, "_run", lambda b: calls.append(b.shape) or run(b))
    ((_, x, _),) = embed_images(distilled, tmp_path, files, [0], 100, batch_size=64)
    assert len(calls) < len(files) and max(c[0] for c in calls) <= UINT8_BATCH
    assert sum(c[0] for c in calls) == len(files)
    alone = np.concatenate(
        [distilled.embed_uint8(decode_uint8(tmp_path / f, distilled.preprocess)[None]) for f in files]
    )
    assert np.allclose(x, alone, atol=1e-6)
    ((_, y, _),) = embed_images(distilled, tmp_path, files, [0], 100, batch_size=64, num_workers=2)
    assert np.array_equal(x, y)


def test_fast_path_unreadable_images(tmp_path, distilled):
    """A corrupt file fails naming it, or is listed with skip_errors; the rest still embed."""
    from PIL import Image

    from diffmem.features.loader import embed_images

    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    for workers in (0, 2):
        with pytest.raises(DataError, match="b.jpg: corrupt or unreadable image"):
            list(embed_images(distilled, tmp_path, ["a.jpg", "b.jpg"], [0], 10, batch_size=4, num_workers=workers))
    ((_, x, skipped),) = embed_images(distilled, tmp_path, ["a.jpg", "b.jpg"], [0], 10, batch_size=4, skip_errors=True)
    assert x.shape == (1, 512) and skipped["file"].tolist() == ["b.jpg"]


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_onnx_embed_imports_no_torch(tmp_path, device):
    """An ONNX-only embed run of real photos loads neither torch (nor torchvision) nor diffusers,
    transformers, open_clip or scipy: config check, device, extractor and loader included."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from diffmem.data.photos import natural_photos

    names = ("astronaut", "coffee", "chelsea")
    for name, arr in natural_photos(names).items():
        Image.fromarray(arr).save(tmp_path / f"{name}.jpg", quality=90)
    (tmp_path / "m.csv").write_text("file,caption\n" + "".join(f"{n}.jpg,{n}\n" for n in names))
    heavy = ("torch", "torchvision", "diffusers", "transformers", "open_clip", "scipy")
    code = (
        "import sys, diffmem; run = diffmem.run('embed', sys.argv[1:]); "
        f"print([m for m in {heavy!r} if m in sys.modules]); "
        "from diffmem.features.store import FeatureStore; print(FeatureStore(run).load()[0].shape)"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "data=folder",
            f"data.root={tmp_path}",
            "data.manifest=m.csv",
            "features=sscd_distilled",
            f"paths.output_dir={tmp_path / 'out'}",
            f"device={device}",
            "threads=1",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "(3, 512)"], out.stdout


def test_stage_extractor_device_and_threads():
    """The stage's device and threads reach an ONNX descriptor (without torch) as they reach a
    torch one (through configure_torch): ``auto`` resolves to the same device."""
    from omegaconf import OmegaConf

    from diffmem.device import resolve_device
    from diffmem.features import build_stage_extractor

    for name, extra in (("pixel", {"size": 8}), ("sscd_distilled", {})):
        cfg = OmegaConf.create({"device": "auto", "threads": 1, "features": {"extractor": {"name": name, **extra}}})
        ext = build_stage_extractor(cfg)
        assert ext.device == resolve_device("auto"), name
    assert ext.threads == 1 and ext.info()["threads"] == 1
    cfg.features.extractor.threads = 2  # the descriptor's own setting wins
    assert build_stage_extractor(cfg).threads == 2


# -- a torch descriptor: resized in worker processes on a CPU, on the device on a GPU -----------


@pytest.fixture(scope="module")
def tiny_torchscript(tmp_path_factory):
    """A small seeded TorchScript descriptor (conv, ReLU, mean: 16-d) with SSCD's interface and a
    bicubic short-side recipe, so camera photos resize to several shapes."""
    import torch

    from diffmem.features.sscd import SSCDExtractor

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).relu().mean((2, 3))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("torchscript") / "tiny.pt"
    torch.jit.save(torch.jit.script(Tiny().eval()), str(path))
    recipe = {"preset": "sscd_official", "size": 64, "interpolation": "bicubic"}
    return lambda device="cpu": SSCDExtractor(path=path, verify=False, preprocess=recipe, device=device)


@pytest.mark.parametrize("workers", [0, 2])
def test_resizing_on_the_device_equals_resizing_in_workers(camera_jpegs, tiny_torchscript, workers):
    """The GPU's loader (decoding threads, the resize on the descriptor's device) run on the CPU
    gives the worker processes' vectors and batches, and each equals the image embedded alone."""
    from diffmem.features.loader import embed_images

    root, files = camera_jpegs
    ext = tiny_torchscript()
    calls: dict[bool, list[tuple]] = {False: [], True: []}
    out = {}
    forward = ext.embed_valid
    for on_device in (False, True):
        ext.embed_valid = lambda x, log=calls[on_device]: log.append(tuple(x.shape)) or forward(x)
        ((_, out[on_device], _),) = embed_images(
            ext, root, files, [0], 100, batch_size=4, num_workers=workers, resize_on_device=on_device
        )
    assert np.array_equal(out[True], out[False])
    assert calls[True] == calls[False] and len({shape[2:] for shape in calls[True]}) > 1
    assert sum(shape[0] for shape in calls[True]) == len(files) and max(s[0] for s in calls[True]) == 4
    alone = np.stack([_float_path(ext, root / f) for f in files])
    assert np.allclose(out[True], alone, atol=1e-6)


def test_a_batch_is_read_back_after_the_next_is_queued(camera_jpegs, tiny_torchscript):
    """The loop queues batch k + 1 before it reads batch k's vectors back (on a GPU, the host
    waits for a result only once the device has the next batch), and reads every batch once."""
    import torch

    from diffmem.features.loader import embed_images

    root, files = camera_jpegs
    ext = tiny_torchscript()
    events: list[str] = []

    class Queued:
        def __init__(self, out: torch.Tensor, k: int) -> None:
            self.out, self.k = out, k

        def cpu(self) -> torch.Tensor:
            events.append(f"read {self.k}")
            return self.out.cpu()

    forward = ext.embed_valid

    def submit(x: torch.Tensor) -> Queued:
        k = sum(e.startswith("queue") for e in events)
        events.append(f"queue {k}")
        return Queued(forward(x), k)

    ext.embed_valid = submit
    ((_, x, _),) = embed_images(ext, root, files, [0], 100, batch_size=2, resize_on_device=True)
    n = sum(e.startswith("queue") for e in events)
    assert n >= 3 and x.shape == (len(files), 16)
    assert sorted(events) == sorted(f"{v} {k}" for k in range(n) for v in ("queue", "read"))
    for k in range(n - 1):
        assert events.index(f"read {k}") > events.index(f"queue {k + 1}")


def test_resizing_on_the_device_with_unreadable_images(tmp_path, tiny_torchscript):
    """On the device path a corrupt file fails naming it, or is listed with skip_errors."""
    from PIL import Image

    from diffmem.features.loader import embed_images

    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    ext, files = tiny_torchscript(), ["a.jpg", "b.jpg"]
    for workers in (0, 2):
        with pytest.raises(DataError, match="b.jpg: corrupt or unreadable image"):
            list(embed_images(ext, tmp_path, files, [0], 10, batch_size=4, num_workers=workers, resize_on_device=True))
    ((_, x, skipped),) = embed_images(
        ext, tmp_path, files, [0], 10, batch_size=4, skip_errors=True, resize_on_device=True
    )
    assert x.shape == (1, 16) and skipped["file"].tolist() == ["b.jpg"]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_loop_waits_once_per_batch(camera_jpegs, tiny_torchscript):
    """On a GPU the device path is chosen by itself, its vectors match the CPU's, and the only
    host synchronisations in the loop are the read-backs, one per batch."""
    import warnings

    import torch

    from diffmem.features.loader import embed_images

    root, files = camera_jpegs
    cpu, gpu = tiny_torchscript("cpu"), tiny_torchscript("cuda")
    batches = []
    forward = gpu.embed_valid
    gpu.embed_valid = lambda x: batches.append(x.device) or forward(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ((_, x, _),) = embed_images(gpu, root, files, [0], 100, batch_size=4, num_workers=2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert batches and all(d.type == "cuda" for d in batches)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= len(batches), [str(w.message) for w in syncs[:3]]
    ((_, y, _),) = embed_images(cpu, root, files, [0], 100, batch_size=4)
    assert np.all(np.sum(x * y, axis=1) > 0.999)


def test_a_gpu_without_decoding_workers_gets_a_hint(caplog, monkeypatch):
    """A torch descriptor on a GPU with num_workers=0 decodes in the main thread: the run says
    so, once; with workers, or on the CPU, it says nothing."""
    from types import SimpleNamespace

    import pandas as pd

    from diffmem import embed

    monkeypatch.setattr(embed, "embed_images", lambda *a, **k: iter(()))
    items = pd.DataFrame({"item_id": ["a"], "file": ["a.jpg"]})
    store = SimpleNamespace(has_part=lambda *a: False)
    for device, workers, hinted in (("cuda:0", 0, True), ("cuda:0", 4, False), ("cpu", 0, False)):
        ext = SimpleNamespace(name="clip", dim=4, needs_torch=True, device=device)
        caplog.clear()
        embed.embed_files(ext, None, items, store, part_size=10, batch_size=4, num_workers=workers)
        assert ["set num_workers to the free CPU cores" in r.message for r in caplog.records] == [True] * hinted
