#!/usr/bin/env python
"""The embed loader's host CPU per image outside the model: what bounds the stage on a fast GPU.

The descriptor is an instant TorchScript model (a mean and a max per channel) with the
``sscd_official`` recipe, so the main thread's time is the loader's own. Per worker count,
one pass each of ``embed_images`` over ``--n`` JPEGs (``bench_embed.py``'s folder; ``--tiny``:
12-18 px images resized to 8 px, so that only Python and dispatch are left):

- **workers**: the CPU path (DataLoader processes decode and resize; the main thread
  receives, stacks and runs the model);
- **device**: the GPU path run on the CPU (threads decode; the main thread converts and
  resizes on the device, stacks and runs the model).

Printed and saved: main-thread CPU ms per image, split into the model call, the resize and
the rest, and ``host ceiling`` = 1000 / host ms, the images/s above which the main thread
cannot feed a GPU. Read it per path: the workers path's stack, check and copy stay on the
host on a GPU too, so its photo figure is its host cost; the device path's conversion,
resize and stack are GPU kernels there but real CPU work here, so only its ``--tiny``
figure (resize included: the launches stay on the host) is its host cost.

    python benchmarks/bench_embed_host.py                       # 1000 photos, 1 and 2 workers
    python benchmarks/bench_embed_host.py --tiny --out /tmp/host_tiny.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from diffmem.runs import write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--n", type=int, default=1000, help="JPEGs in the folder")
    p.add_argument("--tiny", action="store_true", help="12-18 px images: Python and dispatch only")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_embed_host.json"))
    return p.parse_args(argv)


def instant_model(path: Path) -> None:
    """A TorchScript model whose forward pass costs next to nothing: 512-d from channel stats."""
    import torch

    class Instant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1).repeat(1, 86)[:, :512]

    torch.jit.save(torch.jit.script(Instant().eval()), str(path))


def tiny_folder(root: Path, n: int, seed: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        h, w = [(12, 16), (16, 12), (12, 18), (16, 16)][i % 4]
        files.append(f"{i:06d}.jpg")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / files[-1])
    return files


def host_cost(ext, root: Path, files: list[str], workers: int, batch_size: int, on_device: bool) -> dict:
    """Main-thread CPU ms per image of one ``embed_images`` pass, split by where it goes."""
    from diffmem.features.loader import embed_images

    spent = {"model": 0.0, "resize": 0.0}
    main, inside = threading.get_ident(), []  # the model's own (no-op) resize counts as the model's
    embed, resize = ext._embed, ext.preprocess.resize_only

    def timed(key, fn):
        def call(x):
            start = time.thread_time()
            inside.append(key)
            try:
                return fn(x)
            finally:
                inside.pop()
                if threading.get_ident() == main and not inside:
                    spent[key] += time.thread_time() - start

        return call

    ext._embed, ext.preprocess.resize_only = timed("model", embed), timed("resize", resize)
    start = time.thread_time()
    for _ in embed_images(
        ext, root, files, [0], len(files), batch_size=batch_size, num_workers=workers, resize_on_device=on_device
    ):
        pass
    total = time.thread_time() - start
    del ext._embed, ext.preprocess.resize_only
    ms = {k: 1e3 * v / len(files) for k, v in spent.items()}
    ms["rest"] = 1e3 * total / len(files) - ms["model"] - ms["resize"]
    ms["host"] = ms["rest"] + (ms["resize"] if on_device else 0.0)
    ms["host_ceiling_img_s"] = 1e3 / ms["host"]
    return ms


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from diffmem.features import build_extractor

    torch.set_num_threads(1)
    result: dict = {"n_images": args.n, "tiny": args.tiny, "batch_size": args.batch_size, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        if args.tiny:
            files = tiny_folder(root, args.n, args.seed)
        else:
            from bench_embed import make_folder

            files = make_folder(root, args.n, args.seed)
        instant_model(Path(tmp) / "instant.pt")
        recipe = {"preset": "sscd_official", **({"size": 8} if args.tiny else {})}
        ext = build_extractor(
            {"name": "sscd", "path": str(Path(tmp) / "instant.pt"), "verify": False, "preprocess": recipe},
            device="cpu",
        )
        for w in args.workers:
            for path, on_device in (("workers", False), ("device", True)):
                ms = host_cost(ext, root, files, w, args.batch_size, on_device)
                result["runs"][f"{path}_w{w}"] = ms
                print(
                    f"{path:7s} num_workers={w}: main thread ms/img: model {ms['model']:.3f}, resize "
                    f"{ms['resize']:.3f}, rest {ms['rest']:.3f}; host {ms['host']:.3f} "
                    f"-> ceiling {ms['host_ceiling_img_s']:.0f} img/s",
                    flush=True,
                )
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
