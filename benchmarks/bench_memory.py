"""Peak RSS of VAE-encoding N training images on the SD-v1.4-shaped VAE: flat in N.

``diffmem mitigate`` encodes its training images streamed (:func:`diffmem.training.encode_files`:
``batch_size`` files read and encoded at a time, only the latents kept), so its peak memory
does not grow with the dataset. Each N runs in a fresh process (peak RSS = ``ru_maxrss``) on the
VAE of the SD-shaped random pipeline (``conf/arch/sd14_shape.yaml``, built once under the diffmem
cache), with real photos from ``skimage.data`` resized to the resolution as the images.

    python benchmarks/bench_memory.py                         # 512 px, N = 64, 256, 1024 (CPU: hours)
    python benchmarks/bench_memory.py --resolution 64 --n 64 256 1024

Prints one line per N and writes ``benchmarks/results/bench_memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sd_vae_dir() -> Path:
    from omegaconf import OmegaConf

    from diffmem.features.base import default_cache_dir
    from diffmem.models.testbed import cached_pipeline

    return (
        cached_pipeline(
            OmegaConf.load(ROOT / "conf" / "arch" / "sd14_shape.yaml"), default_cache_dir() / "sd14_shape-seed0"
        )
        / "vae"
    )


def write_photos(folder: Path, n: int, resolution: int) -> list[str]:
    """``n`` PNGs cycling through skimage's colour photos, centre-cropped and resized."""
    from PIL import Image
    from skimage import data

    photos = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    files = []
    for i in range(n):
        im = Image.fromarray(photos[i % len(photos)])
        side = min(im.size)
        im = im.crop(((im.width - side) // 2, (im.height - side) // 2, (im.width + side) // 2, (im.height + side) // 2))
        name = f"{i:05d}.png"
        im.resize((resolution, resolution), Image.BICUBIC).rotate(90 * (i // len(photos) % 4)).save(folder / name)
        files.append(name)
    return files


def encode(vae_dir: str, root: str, n: int, resolution: int, batch_size: int, precision: str) -> dict:
    """One measurement (run in its own process)."""
    import torch
    from diffusers import AutoencoderKL

    from diffmem.models.pipeline import resolve_dtype
    from diffmem.training import encode_files

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(
        vae_dir, use_safetensors=True, dtype=resolve_dtype(precision, torch.device("cpu"))
    ).eval()
    vae.enable_slicing()
    files = sorted(p.name for p in Path(root).glob("*.png"))[:n]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    z = encode_files(vae, root, files, resolution, batch_size)
    seconds = time.perf_counter() - start
    assert z.shape == (n, 4, resolution // 8, resolution // 8) and torch.isfinite(z).all()
    return {
        "n": n,
        "seconds": seconds,
        "seconds_per_image": seconds / n,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_load_gib": before / 2**20,
        "latents_mib": z.numel() * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_memory.json"))
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: vae_dir root (one N)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(encode(*args.one, args.n[0], args.resolution, args.batch_size, args.precision)))
        return
    vae_dir = sd_vae_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_photos(Path(tmp), max(args.n), args.resolution)
        for n in args.n:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(vae_dir),
                    tmp,
                    "--n",
                    str(n),
                    "--resolution",
                    str(args.resolution),
                    "--batch-size",
                    str(args.batch_size),
                    "--precision",
                    args.precision,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"N={n:5d} {args.resolution} px {args.precision}: peak RSS {r['peak_rss_gib']:.2f} GiB "
                f"(after loading the VAE {r['rss_after_load_gib']:.2f}), {r['seconds_per_image']:.2f} s/image",
                flush=True,
            )
    result = {
        "what": "peak RSS of VAE-encoding N images (encode_files, streamed), SD v1.4-shaped VAE",
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "vae_slicing": True,
        "threads": 1,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
