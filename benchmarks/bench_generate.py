"""Overhead of ``diffmem generate`` over the bare UNet + VAE forward passes it must run.

Both sides, in one run on the same model and batch: (a) the generate stage's image loop
(prompt encoding, per-sample seeded noise, scheduler, guidance, decode, PNG writes);
(b) the same number of raw ``unet(...)`` calls on a doubled (guidance) batch plus one
``vae.decode``. Prints the ratio a/b; target <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from diffmem.config import ASSETS_DIR
from diffmem.data.samples import plan_samples
from diffmem.models import load_pipeline
from diffmem.runs import write_json
from diffmem.sampling import generate_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ASSETS_DIR / "testbed"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/bench_generate.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, scheduler="ddim")
    res = pipe.vae.config.sample_size
    n = args.batch * args.batches
    prompts = pd.DataFrame({"prompt_id": range(n), "caption": [f"a red circle number {i}" for i in range(n)]})
    plan = plan_samples(prompts, 1, 0)
    shape = (args.batch, pipe.unet.config.in_channels, res // 2, res // 2)
    hidden = pipe.text_encoder.config.hidden_size

    def stage() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate_images(
                pipe,
                plan,
                Path(tmp),
                resolution=res,
                steps=args.steps,
                guidance=5.0,
                batch_size=args.batch,
                desc="bench",
            )
            return time.perf_counter() - t0

    @torch.no_grad()
    def raw() -> float:
        x = torch.randn(shape)
        c = torch.randn(2 * args.batch, 77, hidden)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            for t in range(args.steps):
                pipe.unet(torch.cat([x, x]), torch.tensor(999 - 40 * t), encoder_hidden_states=c)
            pipe.vae.decode(x)
        return time.perf_counter() - t0

    stage(), raw()  # warm-up
    a = min(stage() for _ in range(args.repeats))
    b = min(raw() for _ in range(args.repeats))
    ratio = a / b
    result = {
        "images": n,
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "generate_s": a,
        "raw_forward_s": b,
        "ratio": ratio,
        "target": 1.10,
        "pass": ratio <= 1.10,
    }
    print(json.dumps(result, indent=2))
    print(f"generate / raw forward = {ratio:.3f} (target <= 1.10): {'PASS' if ratio <= 1.10 else 'FAIL'}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
