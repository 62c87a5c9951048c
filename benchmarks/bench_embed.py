#!/usr/bin/env python
"""Embed-stage throughput on a folder of mixed-size JPEGs against the bare descriptor.

A folder of ``--n`` JPEGs (random crops of skimage's colour photos in camera aspect ratios
4:3, 3:4, 3:2, 2:3, 16:9 and 1:1, short side 160-480 px, quality 90) and a ``captions.tsv``
is written to a temporary folder. Per descriptor, one run each of:

- **bare**: the descriptor's forward pass alone, on full batches of the same images already
  decoded, resized and on the device (``--bare-images`` of them, grouped by resized shape;
  ONNX descriptors: uint8 batches of the size the stage uses) — the model's throughput;
- **stage**: ``diffmem embed data=folder`` on the folder (manifest read, decoding,
  batching, parts written), with ``num_workers`` = each of ``--workers``.

Printed and saved: images/s of each, ``ratio`` = stage / bare (target >= 0.9), the
scaling of the stage from the first to the last worker count, and the images/s one thread
decodes (on a GPU, where the stage resizes on the device, decoding is its CPU work, so
``num_workers`` x that bounds the stage). Every process uses
``--threads`` torch / onnxruntime threads (decoding workers one each).

    python benchmarks/bench_embed.py                                  # 5000 JPEGs, sscd_distilled
    python benchmarks/bench_embed.py --features pixel sscd_distilled --n 1000 --out /tmp/b.json
    python benchmarks/bench_embed.py --features clip:pretrained=random --device cuda --workers 4 8 --out /tmp/gpu.json

A descriptor is ``NAME[:FIELD=VALUE,...]``: fields of its extractor config for both sides
(``clip:pretrained=random``, ``sscd_disc_mixup:path=/w/sscd.pt``; values as YAML).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffmem.runs import write_json

ASPECTS = [(4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (1, 1)]
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--n", type=int, default=5000, help="JPEGs in the folder")
    p.add_argument("--features", nargs="+", default=["sscd_distilled"], help="descriptors: NAME[:FIELD=VALUE,...]")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values of the stage")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bare-images", type=int, default=512, help="images the bare forward passes cover")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the torch descriptors run (cuda: the GPU goal, batch 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_embed.json"))
    return p.parse_args(argv)


def make_folder(root: Path, n: int, seed: int) -> list[str]:
    """``n`` mixed-size JPEG crops of skimage photos under ``root`` + ``captions.tsv``."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    files, lines = [], ["File\tCaption"]
    for i in range(n):
        k = int(rng.integers(len(photos)))
        photo = photos[k]
        aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
        h, w = photo.shape[:2]
        scale = min(h / ah, w / aw) * rng.uniform(0.5, 1.0)
        ch, cw = int(ah * scale), int(aw * scale)
        y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        short = int(rng.integers(160, 481))
        size = (short * aw // min(aw, ah), short * ah // min(aw, ah))
        files.append(f"{i // 1000:03d}/{i:06d}.jpg")
        (root / files[-1]).parent.mkdir(exist_ok=True)
        Image.fromarray(photo[y : y + ch, x : x + cw]).resize(size, Image.BILINEAR).save(root / files[-1], quality=90)
        lines.append(f"{files[-1]}\t{PHOTOS[k]} crop {i}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return files


def extractor_cfg(spec: str, threads: int) -> dict:
    """``NAME[:FIELD=VALUE,...]`` -> the extractor's fields (``threads`` where it takes them)."""
    import yaml

    from diffmem.features import extractor_fields

    name, _, fields = spec.partition(":")
    cfg: dict = {"name": name, **({"threads": threads} if "threads" in extractor_fields(name) else {})}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)
    return cfg


def bare(name: str, root: Path, files: list[str], args: argparse.Namespace) -> float:
    """Images/s of the descriptor's forward pass alone: full batches of images already
    decoded, resized by its recipe and on its device (one batch first, untimed, to warm up)."""
    import torch

    from diffmem.data import load_image
    from diffmem.features import build_extractor
    from diffmem.features.loader import UINT8_BATCH, decode_uint8, unit_image

    ext = build_extractor(extractor_cfg(name, args.threads), device=args.device)
    if hasattr(ext, "embed_uint8"):
        size, forward = min(args.batch_size, ext.batch_size, UINT8_BATCH), ext.embed_uint8
        prepare, stack = (lambda f: decode_uint8(root / f, ext.preprocess)), np.stack
    else:
        size, forward, stack = args.batch_size, ext.embed_valid, torch.stack

        def prepare(f: str):
            return unit_image(torch.from_numpy(load_image(root / f)), ext.preprocess.resize_only).to(ext.device)

    groups: dict[tuple, list] = {}
    batches: list = []
    for f in files:
        x = prepare(f)
        group = groups.setdefault(tuple(x.shape), [])
        group.append(x)
        if len(group) == size:
            batches.append(stack(group))
            group.clear()
            if len(batches) * size >= args.bare_images + size:
                break
    if len(batches) < 2:
        raise SystemExit(f"bench_embed: fewer than 2 full batches of {size} images of one shape: use a larger --n")
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    forward(batches[0])
    sync()
    start = time.perf_counter()
    for batch in batches[1:]:
        out = forward(batch)
    np.asarray(out.cpu() if isinstance(out, torch.Tensor) else out)  # the last result read back, as the stage does
    sync()
    return (len(batches) - 1) * size / (time.perf_counter() - start)


def decode_rate(root: Path, files: list[str]) -> float:
    """Images/s one thread decodes (full size, uint8): on a GPU the stage's CPU work per image,
    so ``num_workers`` threads feed at most about ``num_workers`` times this."""
    from diffmem.data import load_image

    start = time.perf_counter()
    for f in files:
        load_image(root / f)
    return len(files) / (time.perf_counter() - start)


def stage(spec: str, root: Path, n: int, out: Path, workers: int, batch_size: int, threads: int, device: str) -> float:
    """Images/s of ``diffmem embed`` on the folder (a fresh run dir)."""
    import json

    import diffmem

    name = spec.partition(":")[0]
    start = time.perf_counter()
    diffmem.run(
        "embed",
        [
            "data=folder",
            f"data.root={root}",
            "data.manifest=captions.tsv",
            f"features={name}",
            f"paths.output_dir={out}",
            f"name={name}-w{workers}",
            f"num_workers={workers}",
            f"batch_size={batch_size}",
            f"threads={threads}",
            f"device={device}",
        ]
        + [
            f"features.extractor.{k}={v if isinstance(v, str) else json.dumps(v)}"
            for k, v in extractor_cfg(spec, threads).items()
            if k != "name"
        ],
    )
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    result = {
        "n_images": args.n,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "device": args.device,
        "features": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        files = make_folder(root, args.n, args.seed)
        result["megapixels_mean"] = float(np.mean([np.prod(Image.open(root / f).size) for f in files]) / 1e6)
        result["decode_img_s_per_thread"] = decode_rate(root, files[:500])
        print(f"decode alone (full size, uint8, one thread): {result['decode_img_s_per_thread']:.0f} img/s", flush=True)
        for name in args.features:
            row = {"bare_img_s": bare(name, root, files, args)}
            for w in args.workers:
                row[f"stage_img_s_workers{w}"] = stage(
                    name, root, len(files), Path(tmp) / "out", w, args.batch_size, args.threads, args.device
                )
                row[f"ratio_workers{w}"] = row[f"stage_img_s_workers{w}"] / row["bare_img_s"]
            first, last = args.workers[0], args.workers[-1]
            row[f"scaling_workers{last}_vs_{first}"] = (
                row[f"stage_img_s_workers{last}"] / row[f"stage_img_s_workers{first}"]
            )
            result["features"][name] = row
            print(
                f"{name}: bare {row['bare_img_s']:.1f} img/s; "
                + "; ".join(
                    f"stage num_workers={w} {row[f'stage_img_s_workers{w}']:.1f} img/s "
                    f"(ratio {row[f'ratio_workers{w}']:.3f})"
                    for w in args.workers
                )
                + f"; workers {last} vs {first}: x{row[f'scaling_workers{last}_vs_{first}']:.2f}",
                flush=True,
            )
    best = max(max(r[f"ratio_workers{w}"] for w in args.workers) for r in result["features"].values())
    result["target_ratio"], result["meets_target"] = 0.9, bool(best >= 0.9)
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
