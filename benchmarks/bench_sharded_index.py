#!/usr/bin/env python
"""Sharded IVF index build through the CLI (train, submitit_local adds, merge) vs one process.

One run, one synthetic embed run (a seeded Gaussian mixture of unit vectors written part
by part in the embed stage's on-disk format), one factory string, both built by the real
``diffmem index`` CLI:

(a) sharded: ``mode=train``, then ONE Hydra multirun ``--multirun
    hydra/launcher=submitit_local mode=add shard=0,...,n-1 num_shards=n`` (one
    submitit_local job per shard, all in the train run's dir), then ``mode=merge``;
(b) single: ``mode=single`` (same factory, training sample size, seed and features;
    ``recall.queries=0`` so it does no more work than the sharded build).

Checks (exit status 1 unless all pass), on --n-queries held-out queries, top --k:
- merged vs single at --nprobe: same ids, scores within --tol (the trained centroids are
  compared too: a different training sample explains mismatches);
- merged vs the CLI's ``empty.faiss`` filled in this process in one go (isolates the
  shard + merge step from training);
- ``diffmem.index.streaming_search`` (exact top-k, ``.npy`` parts streamed into a
  ``faiss.ResultHeap``) vs the single build searched exhaustively (nprobe = nlist).
Reported: wall time and peak RSS (largest process of each phase's process tree, from
``os.wait4``) per phase, with ``--cfg job`` timed as the per-process start-up overhead;
index sizes on disk; a linear extrapolation to --extrapolate-to vectors (formula printed).

    python benchmarks/bench_sharded_index.py                       # 2M x 64, 4 shards
    OMP_NUM_THREADS=1 python benchmarks/bench_sharded_index.py --n 20000 --shards 2 \
        --nlist 64 --n-clusters 256 --train-sample 5000 --part-size 4096 --json /tmp/b.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_search import add_clustered_args, make_clustered  # bench_search's synthetic data (beside this file)

from diffmem.features.store import FeatureStore
from diffmem.index import load_index, search, set_search_params, streaming_search
from diffmem.runs import mark_done, write_json

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--n", type=int, default=2_000_000, help="database vectors")
    p.add_argument("--dim", type=int, default=64, help="descriptor dimension")
    p.add_argument("--shards", type=int, default=4, help="add jobs (num_shards)")
    p.add_argument("--part-size", type=int, default=65536, help="rows per features/part-*.npy")
    add_clustered_args(p)
    p.add_argument("--nlist", type=int, default=1024, help="IVF lists (factory IVF<nlist>,Flat)")
    p.add_argument("--train-sample", type=int, default=262144, help="index.train_sample")
    p.add_argument("--nprobe", type=int, default=32, help="nprobe of the comparison")
    p.add_argument("--n-queries", type=int, default=2000, help="held-out query vectors")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--tol", type=float, default=1e-5, help="score tolerance")
    p.add_argument("--extrapolate-to", type=int, default=10_000_000, help="vectors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default="/tmp/diffmem_bench_sharded_index",
        help="work folder (must not exist or be empty; removed at the end)",
    )
    p.add_argument("--keep", action="store_true", help="keep --out at the end")
    p.add_argument("--ondisk", action="store_true", help="merge into on-disk inverted lists (ondisk=true)")
    p.add_argument("--json", default=str(REPO / "benchmarks/results/bench_sharded_index.json"))
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, flush=True)


def write_embed_run(run_dir: Path, args) -> np.ndarray:
    """Write a synthetic embed run (one part at a time); return held-out queries."""
    seeds = np.random.SeedSequence(args.seed).spawn(2 + -(-args.n // args.part_size))
    _, centres = make_clustered(0, args.dim, args.n_clusters, args.noise, np.random.default_rng(seeds[0]))

    def rows(seed, n):
        return make_clustered(n, args.dim, args.n_clusters, args.noise, np.random.default_rng(seed), centres)[0]

    (run_dir / "features").mkdir(parents=True)
    schema = pa.schema([("item_id", pa.int64()), ("file", pa.string())])
    with pq.ParquetWriter(run_dir / "ids.parquet", schema) as ids:
        for p, start in enumerate(range(0, args.n, args.part_size)):
            n = min(args.part_size, args.n - start)
            np.save(run_dir / "features" / f"part-{p:05d}.npy", rows(seeds[2 + p], n))
            item = np.arange(start, start + n)
            ids.write_table(pa.table({"item_id": item, "file": [f"synthetic/{i:08d}.png" for i in item]}, schema))
    write_json(
        run_dir / "info.json",
        {
            "feature": "synthetic",
            "dim": args.dim,
            "n": args.n,
            "source": "synthetic",
            "n_clusters": args.n_clusters,
            "noise": args.noise,
            "seed": args.seed,
        },
    )
    mark_done(run_dir, {"n": args.n})
    return rows(seeds[1], args.n_queries)


def run_cli(args: list[str], env: dict, log_file: Path) -> tuple[float, float]:
    """``diffmem index <args>`` in a subprocess: (wall seconds, peak RSS MiB of the largest
    process in its tree, i.e. it and every descendant it waited for)."""
    cmd = [sys.executable, "-m", "diffmem.cli", "index", *args]
    t = time.perf_counter()
    with open(log_file, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{log_file.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def centroids(index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def compare(a, b):
    """(queries whose id rows differ, max |score difference|) of two ``search`` results."""
    (sa, ia), (sb, ib) = a, b
    return int((ia != ib).any(axis=1).sum()), float(np.abs(sa - sb).max())


def one_process_add(empty_path: Path, feats: Path):
    """The trained empty index filled in this process, part by part, under global row ids."""
    index = faiss.read_index(str(empty_path))
    offset = 0
    for part in FeatureStore(feats).part_paths():
        x = np.load(part)
        index.add_with_ids(x, np.arange(offset, offset + len(x), dtype=np.int64))
        offset += len(x)
    return index


def main(args) -> int:
    if -(-args.n // args.part_size) < args.shards:
        sys.exit(
            f"{args.shards} shards but only {-(-args.n // args.part_size)} feature parts: "
            f"lower --part-size (a mode=add shard with no parts fails)"
        )
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty; remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    outputs, feats = out / "outputs", out / "embed"
    env = {**os.environ, "DIFFMEM_OUTPUTS": str(outputs), "HYDRA_FULL_ERROR": "1"}
    factory = f"IVF{args.nlist},Flat"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    log(
        f"setup: {args.n} x {args.dim} float32 ({args.n * args.dim * 4 / 2**20:.0f} MiB), "
        f"{args.n_clusters} clusters, {factory}, train_sample {args.train_sample}, "
        f"{args.shards} shards, nprobe {args.nprobe}, {args.n_queries} queries, k={args.k}, "
        f"OMP_NUM_THREADS={threads}, cpus {os.cpu_count()}, faiss {faiss.__version__}"
    )

    t0 = time.perf_counter()
    xq = write_embed_run(feats, args)
    t_data = time.perf_counter() - t0
    log(f"synthetic embed run written in {t_data:.1f} s: {feats}")

    common = [
        f"features_dir={feats}",
        "index=ivf",
        f"index.factory='{factory}'",
        f"index.train_sample={args.train_sample}",
        f"index.nprobe={args.nprobe}",
        f"seed={args.seed}",
    ]
    sharded = [*common, "name=sharded", f"num_shards={args.shards}"]
    sharded_dir, single_dir = outputs / "index" / "sharded", outputs / "index" / "single"
    shard_list = ",".join(str(i) for i in range(args.shards))
    phases = {
        "startup": ["--cfg", "job", *common],  # imports + config only: per-process overhead
        "train": ["mode=train", *sharded],
        # every add job (its own Hydra job dir) writes its shard into build_dir = the train run's dir
        "add": ["--multirun", "hydra/launcher=submitit_local", "mode=add", f"shard={shard_list}", *sharded],
        "merge": ["mode=merge", f"ondisk={str(args.ondisk).lower()}", *sharded],
        "single": ["mode=single", *common, "name=single", "recall.queries=0"],
    }
    times, rss = {}, {}
    for phase, cli_args in phases.items():
        times[phase], rss[phase] = run_cli(cli_args, env, out / f"{phase}.log")
        log(f"  {phase:<8}{times[phase]:8.1f} s   peak RSS {rss[phase]:8.0f} MiB")
    sharded_s = times["train"] + times["add"] + times["merge"]

    merged, merged_info = load_index(sharded_dir)
    single, single_info = load_index(single_dir)
    control = one_process_add(sharded_dir / "empty.faiss", feats)
    assert merged.ntotal == single.ntotal == control.ntotal == args.n
    centroid_diff = float(np.abs(centroids(merged) - centroids(single)).max())
    for index in (merged, single, control):
        set_search_params(index, nprobe=args.nprobe)
    res_merged, res_single = search(merged, xq, args.k), search(single, xq, args.k)
    mismatches, score_diff = compare(res_merged, res_single)
    ok = mismatches == 0 and score_diff <= args.tol
    control_mismatches, control_diff = compare(res_merged, search(control, xq, args.k))
    control_ok = control_mismatches == 0 and control_diff <= args.tol
    log(
        f"merged vs single (mode=single) at nprobe {args.nprobe}: {mismatches} of "
        f"{args.n_queries} queries with different ids, max |score diff| {score_diff:.2e} "
        f"-> {'PASS' if ok else 'FAIL'}"
    )
    why = "" if centroid_diff == 0 else " (mode=train and mode=single trained different quantizers)"
    log(f"  trained centroids: max |merged - single| {centroid_diff:.3g}{why}")
    log(
        f"merged vs one-process add into the same empty.faiss: {control_mismatches} queries with "
        f"different ids, max |score diff| {control_diff:.2e} -> {'PASS' if control_ok else 'FAIL'}"
    )
    log(
        f"nprobe stored in the index files: merged {merged_info.get('nprobe')}, single "
        f"{single_info.get('nprobe')} (index.nprobe={args.nprobe})"
    )

    t0 = time.perf_counter()
    res_stream = streaming_search(FeatureStore(feats).part_paths(), xq, args.k)
    t_stream = time.perf_counter() - t0
    set_search_params(single, nprobe=args.nlist)
    stream_mismatches, stream_diff = compare(res_stream, search(single, xq, args.k))
    stream_ok = stream_diff <= args.tol  # exact search: ids may differ only between tied scores
    recall1 = float((res_single[1][:, 0] == res_stream[1][:, 0]).mean())
    log(
        f"streaming_search (exact; .npy parts streamed into a ResultHeap) {t_stream:.1f} s vs "
        f"single build at nprobe=nlist: {stream_mismatches} queries with different ids, max "
        f"|score diff| {stream_diff:.2e} -> {'PASS' if stream_ok else 'FAIL'}; single build "
        f"recall@1 at nprobe {args.nprobe}: {recall1:.4f}"
    )

    sizes = {
        "merged_index": sum(p.stat().st_size for p in sharded_dir.glob("index.*")),  # + index.ivfdata
        "single_index": (single_dir / "index.faiss").stat().st_size,
        "shards": sum(p.stat().st_size for p in (sharded_dir / "shards").glob("*.faiss")),
        "empty_index": (sharded_dir / "empty.faiss").stat().st_size,
        "features": sum(p.stat().st_size for p in FeatureStore(feats).part_paths()),
    }
    scale, c = args.extrapolate_to / args.n, times["startup"]
    extra = {
        "add_s": c + max(times["add"] - c, 0) * scale,
        "merge_s": c + max(times["merge"] - c, 0) * scale,
        "single_s": times["train"] + max(times["single"] - times["train"], 0) * scale,
        "merged_index_bytes": sizes["merged_index"] * scale,
        "features_bytes": sizes["features"] * scale,
    }
    extra["sharded_s"] = times["train"] + extra["add_s"] + extra["merge_s"]
    formula = (
        f"s = {args.extrapolate_to}/{args.n}; c = startup (process start, imports, config: "
        f"{c:.1f} s); add' = c + (add - c) s; merge' = c + (merge - c) s; train' = train "
        f"(same training sample); single' = train + (single - train) s; sharded' = train' "
        f"+ add' + merge'; disk' = disk s"
    )

    log("")
    log(f"{'phase':<34}{'seconds':>9}{'peak RSS MiB':>14}")
    for phase in phases:
        log(f"{phase:<34}{times[phase]:>9.1f}{rss[phase]:>14.0f}")
    log(f"{'sharded total (train+add+merge)':<34}{sharded_s:>9.1f}")
    log(
        f"sharded / single wall time: {sharded_s / times['single']:.2f}x "
        f"({args.shards} add jobs on {os.cpu_count()} cpus)"
    )
    log("(peak RSS: the largest single process of each phase's process tree, not the sum of concurrent add jobs)")
    log(
        f"disk: merged index {sizes['merged_index'] / 2**20:.1f} MiB, single index "
        f"{sizes['single_index'] / 2**20:.1f} MiB, shards {sizes['shards'] / 2**20:.1f} MiB, "
        f"features {sizes['features'] / 2**20:.1f} MiB"
    )
    log(
        f"extrapolated to {args.extrapolate_to} vectors: add {extra['add_s']:.0f} s, merge "
        f"{extra['merge_s']:.0f} s, sharded total {extra['sharded_s']:.0f} s, single "
        f"{extra['single_s']:.0f} s, merged index {extra['merged_index_bytes'] / 2**30:.2f} GiB, "
        f"features {extra['features_bytes'] / 2**30:.2f} GiB"
    )
    log(f"  formula: {formula}")

    results = {
        "setup": {
            "n": args.n,
            "dim": args.dim,
            "shards": args.shards,
            "part_size": args.part_size,
            "n_clusters": args.n_clusters,
            "noise": args.noise,
            "factory": factory,
            "train_sample": args.train_sample,
            "nprobe": args.nprobe,
            "n_queries": args.n_queries,
            "k": args.k,
            "tol": args.tol,
            "seed": args.seed,
            "omp_num_threads": threads,
            "cpu_count": os.cpu_count(),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
        "seconds": {**times, "sharded_total": sharded_s, "data": t_data, "streaming_search": t_stream},
        "peak_rss_mib": rss,
        "sizes_bytes": sizes,
        "check": {
            "merged_vs_single": {
                "query_mismatches": mismatches,
                "max_score_diff": score_diff,
                "centroid_max_abs_diff": centroid_diff,
                "pass": ok,
            },
            "merged_vs_one_process_add": {
                "query_mismatches": control_mismatches,
                "max_score_diff": control_diff,
                "pass": control_ok,
            },
            "streaming_vs_single_exhaustive": {
                "query_mismatches": stream_mismatches,
                "max_score_diff": stream_diff,
                "pass": stream_ok,
            },
            "single_recall@1_at_nprobe": recall1,
            "stored_nprobe": {"merged": merged_info.get("nprobe"), "single": single_info.get("nprobe")},
        },
        "extrapolation": {"to_n": args.extrapolate_to, "formula": formula, **extra},
    }
    write_json(args.json, results)
    log(f"results written to {args.json}")
    if not args.keep:
        shutil.rmtree(out)
    return 0 if ok and control_ok and stream_ok else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
