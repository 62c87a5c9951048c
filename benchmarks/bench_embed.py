#!/usr/bin/env python
"""Embed-stage throughput on a folder of mixed-size JPEGs against the bare descriptor.

A folder of ``--n`` JPEGs (random crops of skimage's colour photos in camera aspect ratios
4:3, 3:4, 3:2, 2:3, 16:9 and 1:1, short side 160-480 px, quality 90) and a ``captions.tsv``
is written to a temporary folder. Per descriptor, one run each of:

- **bare**: the descriptor on the same images already decoded in memory (its own resize
  included), batched by resized shape — the best the stage could do;
- **stage**: ``diffmem embed data=folder`` on the folder (manifest read, decoding,
  batching, parts written), with ``num_workers`` = each of ``--workers``.

Printed and saved: images/s of each, ``ratio`` = stage / bare (target >= 0.9) and the
scaling of the stage from the first to the last worker count. Every process uses
``--threads`` torch / onnxruntime threads (decoding workers one each).

    python benchmarks/bench_embed.py                                  # 5000 JPEGs, sscd_distilled
    python benchmarks/bench_embed.py --features pixel sscd_distilled --n 1000 --out /tmp/b.json
    python benchmarks/bench_embed.py --features clip --device cuda --workers 4 8 --out /tmp/gpu.json   # the GPU goal
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
    p.add_argument("--features", nargs="+", default=["sscd_distilled"], help="descriptors to time")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values of the stage")
    p.add_argument("--batch-size", type=int, default=64)
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


def extractor_cfg(name: str, threads: int) -> dict:
    return {"name": name, "threads": threads} if name.startswith("sscd") else {"name": name}


def bare(name: str, root: Path, files: list[str], batch_size: int, threads: int, device: str) -> float:
    """Images/s of the descriptor alone on the decoded images, batched by resized shape."""
    import torch

    from diffmem.data import load_image
    from diffmem.features import build_extractor

    ext = build_extractor(extractor_cfg(name, threads), device=device)
    decoded = [torch.from_numpy(load_image(root / f)).permute(2, 0, 1) for f in files]
    start = time.perf_counter()
    groups: dict[tuple, list] = {}
    for img in decoded:
        x = ext.preprocess.resize_only(img[None].float().div(255.0))[0]
        groups.setdefault(tuple(x.shape), []).append(x)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            ext(torch.stack(group[i : i + batch_size]))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return len(files) / (time.perf_counter() - start)


def stage(name: str, root: Path, n: int, out: Path, workers: int, batch_size: int, threads: int, device: str) -> float:
    """Images/s of ``diffmem embed`` on the folder (a fresh run dir)."""
    import diffmem

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
        + ([f"features.extractor.threads={threads}"] if name.startswith("sscd") else []),
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
        for name in args.features:
            row = {"bare_img_s": bare(name, root, files, args.batch_size, args.threads, args.device)}
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
