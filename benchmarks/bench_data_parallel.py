#!/usr/bin/env python
"""Data-parallel benchmark: 1 vs N processes (gloo on the CPU, NCCL on GPUs) for a LoRA
fine-tune and for generate on the shipped testbed model.

Each configuration starts ``torchrun --nproc_per_node P`` on this script's worker, which loads
the model, then times only the work between two barriers: ``--steps`` LoRA steps of global
batch ``--batch-size`` (:func:`diffmem.mitigations.finetune.finetune`, the fit loop every
fine-tuning mitigation uses) and ``--samples`` generations in batches of ``--gen-batch``
(:func:`diffmem.sampling.generate_images` with ``shard=True``, as ``diffmem generate``).
Configurations alternate (``--repeats`` rounds) so that a loaded machine hurts them alike;
the median is reported with the speed-up over the first configuration and the efficiency
(speed-up / processes). Process start and model load are left out: they do not shrink with
more processes and are reported separately (``start_s``: the command's wall time minus the
timed work).

    python benchmarks/bench_data_parallel.py                               # 1x2 threads, 1x1, 2x1 on the CPU
    python benchmarks/bench_data_parallel.py --configs 1x1,2x1,4x1 --device cuda   # GPUs: P processes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--configs", default="1x2,1x1,2x1", help="processes x threads per process; speed-ups are over the first"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=12, help="LoRA fine-tuning steps")
    p.add_argument("--batch-size", type=int, default=16, help="global fine-tuning batch")
    p.add_argument("--samples", type=int, default=24, help="generations")
    p.add_argument("--gen-batch", type=int, default=4, help="generations per batch")
    p.add_argument("--gen-steps", type=int, default=10, help="sampling steps")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/bench_data_parallel.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a torchrun rank: write timings to this file
    return p.parse_args(argv)


def worker(args) -> None:
    """One rank: load the testbed model, time the fine-tune and the generation between barriers."""
    import pandas as pd
    from omegaconf import OmegaConf

    import diffmem
    from diffmem import distributed as dist
    from diffmem.data import load_dataset
    from diffmem.data.samples import plan_samples
    from diffmem.device import resolve_device
    from diffmem.loading import load_model
    from diffmem.mitigations.finetune import finetune, prepare, selected_blocks
    from diffmem.sampling import generate_images
    from diffmem.training import encode_files

    cfg = diffmem.compose("mitigate", ["mitigation=lora", f"device={args.device}"])
    pipe = load_model(cfg.model, resolve_device(args.device), scheduler=cfg.scheduler)
    root, manifest = load_dataset(cfg.data)
    rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    prompts = rows.drop_duplicates("caption").head(max(1, args.samples // 2))
    plan = plan_samples(
        pd.DataFrame({"prompt_id": range(len(prompts)), "caption": prompts["caption"].tolist()}),
        -(-args.samples // len(prompts)),
        0,
    ).head(args.samples)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        dist.barrier("bench: start")
        start = time.perf_counter()
        generate_images(
            pipe,
            plan,
            Path(tmp),
            resolution=cfg.resolution,
            steps=args.gen_steps,
            guidance=cfg.guidance_scale,
            batch_size=args.gen_batch,
            shard=True,
        )
        dist.barrier("bench: generated")
        out["generate_s"] = time.perf_counter() - start

    latents = encode_files(pipe.vae, root, rows["file"].tolist(), cfg.resolution)
    s = OmegaConf.merge(
        cfg.mitigation, {"steps": args.steps, "batch_size": args.batch_size, "ckpt_every": 10**6, "objectives": False}
    )
    prepare(pipe.unet, "lora", selected_blocks(pipe.unet, None), int(s.rank))
    with tempfile.TemporaryDirectory() as tmp:
        dist.barrier("bench: fine-tune")
        start = time.perf_counter()
        finetune(pipe, latents, rows["caption"].astype(str).tolist(), s, seed=0, ckpt_dir=Path(tmp) / "ckpt")
        dist.barrier("bench: fine-tuned")
        out["finetune_s"] = time.perf_counter() - start
    if dist.is_main():
        Path(args.worker).write_text(json.dumps(out))


def run_config(args, procs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "t.json"
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--nproc_per_node",
            str(procs),
            __file__,
            "--worker",
            str(result),
            "--device",
            args.device,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--samples",
            str(args.samples),
            "--gen-batch",
            str(args.gen_batch),
            "--gen-steps",
            str(args.gen_steps),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{procs}x{threads} failed:\n{done.stderr[-3000:]}")
        out = json.loads(result.read_text())
    return {**out, "start_s": wall - out["generate_s"] - out["finetune_s"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    runs: dict = {c: [] for c in configs}
    for r in range(args.repeats):
        for c in configs:  # alternated, so load on the machine hits every configuration
            runs[c].append(run_config(args, *c))
            print(f"round {r + 1}: {c[0]} process(es) x {c[1]} thread(s): {runs[c][-1]}", flush=True)
    base = configs[0]
    table = []
    for c in configs:
        row = {"processes": c[0], "threads": c[1]}
        for key in ("finetune_s", "generate_s", "start_s"):
            row[key] = statistics.median(x[key] for x in runs[c])
        for key in ("finetune_s", "generate_s"):
            speedup = statistics.median(x[key] for x in runs[base]) / row[key]
            row[key.replace("_s", "_speedup")] = speedup
            row[key.replace("_s", "_efficiency")] = speedup * base[0] / c[0]
        table.append(row)
    print(
        f"\n{'procs x threads':>15} | {'fine-tune s':>11} {'speed-up':>8} {'eff.':>5} | "
        f"{'generate s':>10} {'speed-up':>8} {'eff.':>5} | {'start+load s':>12}"
    )
    for row in table:
        print(
            f"{row['processes']:>9} x {row['threads']:<3} | {row['finetune_s']:>11.1f} {row['finetune_speedup']:>8.2f} "
            f"{row['finetune_efficiency']:>5.2f} | {row['generate_s']:>10.1f} {row['generate_speedup']:>8.2f} "
            f"{row['generate_efficiency']:>5.2f} | {row['start_s']:>12.1f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if k != "worker"},
                "cpus": os.cpu_count(),
                "load_avg_at_end": os.getloadavg(),
                "table": table,
                "runs": {f"{p}x{t}": v for (p, t), v in runs.items()},
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
