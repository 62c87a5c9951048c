#!/usr/bin/env python
"""Dedup grouping at scale: FAISS range search + connected components on synthetic vectors.

Synthetic unit vectors (``--dim``, default 512: SSCD's), of which ``--clusters`` planted
near-duplicate clusters of 2-8 members (each member a centre plus noise, cosine ~0.8-0.95
to the centre: the SSCD range of edited copies) and the rest random (cosine ~0 +- 0.05 to
everything). Each configuration runs :func:`diffmem.index.dedup.group_vectors` in its own
process, so its peak RSS (``ru_maxrss``) is its own; the vectors are generated in that
process in chunks (``n x dim x 4`` bytes of them count in the peak).

- exact (``Flat``) and each ``--ivf`` configuration (``FACTORY:NPROBE``) on ``--n-exact``
  vectors: time, peak RSS, the share of planted clusters recovered exactly (one group, no
  intruder) and the recall / precision of the planted pairs (recall at a given nlist and
  nprobe is the chance that a pair's ends fall in cells one of them probes; while the planted
  clusters are about as many as the cells, k-means gives each its own and IVF looks perfect:
  measure recall at scale, or with ``--sweep``);
- ``--scale-ivf`` on ``--n`` vectors (default 1M; 0 skips it): the same figures; or, with
  ``--sweep``, that index searched at several nprobe by the planted vectors alone (:func:`sweep`).

    python benchmarks/bench_dedup_groups.py                       # 1M vectors at nprobe 8: ~20 CPU-min
    python benchmarks/bench_dedup_groups.py --n-exact 0 --sweep 4 8 16 32  # recall per nprobe at 1M: ~12 CPU-min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from diffmem.runs import write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--n", type=int, default=1_000_000, help="vectors of the IVF run at scale")
    p.add_argument("--n-exact", type=int, default=50_000, help="vectors of the exact vs IVF comparison (0: none)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--cluster-share", type=float, default=0.1, help="share of the vectors in planted clusters")
    p.add_argument("--threshold", type=float, default=0.75)
    p.add_argument(
        "--ivf",
        nargs="+",
        default=["IVF1024,Flat:4", "IVF1024,Flat:8"],
        help="FACTORY:NPROBE of the approximate runs beside the exact one",
    )
    p.add_argument("--scale-ivf", default="IVF1024,Flat:8", help="FACTORY:NPROBE of the run on --n vectors")
    p.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=[],
        help="instead of the full run on --n vectors: these nprobe values on --scale-ivf's index, queried by the "
        "planted members alone (their recall is the full run's; its CPU extrapolated)",
    )
    p.add_argument("--train-sample", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/bench_dedup_groups.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) and print its result
    return p.parse_args(argv)


def planted(n: int, dim: int, cluster_share: float, seed: int):
    """``(vectors [n, dim] float32 unit, cluster id per row or -1)``: clusters of 2-8 members
    around random centres (noise so that members sit at cosine ~0.8-0.95 to the centre)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):  # chunks bound the temporaries
        c = rng.standard_normal((min(65536, n - s), dim), dtype=np.float32)
        x[s : s + len(c)] = c / np.linalg.norm(c, axis=1, keepdims=True)
    label = np.full(n, -1, np.int64)
    sizes = rng.integers(2, 9, size=int(n * cluster_share / 5))
    rows = rng.permutation(n)[: sizes.sum()]
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    for cid, (st, sz) in enumerate(zip(starts, sizes)):
        members = rows[st : st + sz]
        centre = x[members[0]]
        noise = rng.standard_normal((sz - 1, dim), dtype=np.float32)
        noise *= rng.uniform(0.35, 0.7, (sz - 1, 1)) / np.linalg.norm(noise, axis=1, keepdims=True)
        m = centre + noise
        x[members[1:]] = m / np.linalg.norm(m, axis=1, keepdims=True)
        label[members] = cid
    return x, label


def score(group, truth) -> dict:
    """Planted clusters against a grouping (any label per row): the share of clusters recovered
    exactly (their members share one group and that group has no one else), and the recall and
    precision of the within-cluster pairs."""
    import numpy as np

    group = np.unique(group, return_inverse=True)[1]
    planted_rows = truth >= 0
    by_cluster = {}
    for g, t in zip(group[planted_rows], truth[planted_rows]):
        by_cluster.setdefault(t, set()).add(g)
    sizes = np.bincount(group)
    csize = np.bincount(truth[planted_rows])
    recovered = sum(len(gs) == 1 and sizes[next(iter(gs))] == csize[t] for t, gs in by_cluster.items())
    # pairs: within-group pairs vs within-cluster pairs (from the sizes of groups and their overlaps)
    pairs_pred = int((sizes * (sizes - 1) // 2).sum())
    pairs_true = int((csize * (csize - 1) // 2).sum())
    both = {}
    for g, t in zip(group[planted_rows], truth[planted_rows]):
        both[(g, t)] = both.get((g, t), 0) + 1
    pairs_hit = sum(v * (v - 1) // 2 for v in both.values())
    return {
        "groups": int(len(sizes)),
        "planted_clusters": int(len(csize)),
        "clusters_recovered": round(recovered / len(csize), 4),
        "pair_recall": round(pairs_hit / pairs_true, 4),
        "pair_precision": round(pairs_hit / max(pairs_pred, 1), 4),
    }


def one(cfg: dict) -> dict:
    """Generate, group and score one configuration (in its own process)."""
    import resource
    import time

    from diffmem.index import set_threads
    from diffmem.index.dedup import group_vectors

    set_threads(cfg["threads"])
    x, truth = planted(cfg["n"], cfg["dim"], cfg["cluster_share"], cfg["seed"])
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, c0 = time.perf_counter(), time.process_time()
    df = group_vectors(
        x,
        cfg["threshold"],
        factory=cfg["factory"],
        nprobe=cfg.get("nprobe"),
        train_sample=cfg.get("train_sample"),
        seed=cfg["seed"],
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        **cfg,
        "seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_after_vectors_mb": round(rss_data),
        "vectors_mb": round(x.nbytes / 2**20),
        **score(df["group"].to_numpy(), truth),
    }


def sweep(cfg: dict) -> dict:
    """One IVF index on ``n`` vectors, searched at each of ``nprobes`` by the planted clusters'
    members alone: every planted pair has both ends among them, so the pair recall is the full
    run's at a tenth of its queries (random vectors never reach the threshold with anything:
    precision 1.0 in every full run). The full run's CPU is extrapolated: the index's build plus
    ``n`` times the measured CPU per query."""
    import resource
    import time

    import numpy as np

    from diffmem.index import set_threads
    from diffmem.index.build import build_index, set_search_params
    from diffmem.index.dedup import QUERY_BATCH, merge_components

    set_threads(cfg["threads"])
    x, truth = planted(cfg["n"], cfg["dim"], cfg["cluster_share"], cfg["seed"])
    c0 = time.process_time()
    index = build_index(x, cfg["factory"], "ip", train_sample=cfg["train_sample"], seed=cfg["seed"])
    build = time.process_time() - c0
    queries = np.flatnonzero(truth >= 0)
    out = []
    for nprobe in cfg["nprobes"]:
        set_search_params(index, nprobe, None)
        labels = np.arange(len(x))
        c0 = time.process_time()
        for s in range(0, len(queries), QUERY_BATCH):
            q = queries[s : s + QUERY_BATCH]
            lims, _, ids = index.range_search(x[q], cfg["threshold"])
            a = np.repeat(q, np.diff(lims).astype(np.int64))
            labels = merge_components(labels, a[a != ids], ids[a != ids])
        per_query = (time.process_time() - c0) / len(queries)
        out.append(
            {
                "nprobe": nprobe,
                "cpu_ms_per_query": round(per_query * 1000, 3),
                "full_run_cpu_s_extrapolated": round(build + per_query * len(x)),
                **score(labels, truth),
            }
        )
    return {
        **cfg,
        "build_cpu_seconds": round(build, 1),
        "queries": len(queries),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "sweep": out,
    }


def run_one(cfg: dict) -> dict:
    env = {
        **os.environ,
        **{v: str(cfg["threads"]) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def ivf(spec: str, train_sample: int) -> dict:
    """``FACTORY:NPROBE`` -> the configuration's keys."""
    factory, _, nprobe = spec.rpartition(":")
    return {"factory": factory, "nprobe": int(nprobe), "train_sample": train_sample}


def main(args) -> dict:
    base = {
        "dim": args.dim,
        "cluster_share": args.cluster_share,
        "threshold": args.threshold,
        "threads": args.threads,
        "seed": args.seed,
    }
    runs = []
    if args.n_exact:
        runs.append({**base, "n": args.n_exact, "factory": "Flat"})
        runs += [{**base, "n": args.n_exact, **ivf(spec, args.train_sample)} for spec in args.ivf]
    if args.n and args.sweep:
        factory = ivf(args.scale_ivf, args.train_sample)["factory"]
        runs.append({**base, "n": args.n, "factory": factory, "train_sample": args.train_sample, "nprobes": args.sweep})
    elif args.n:
        runs.append({**base, "n": args.n, **ivf(args.scale_ivf, args.train_sample)})
    results = []
    for cfg in runs:
        res = run_one(cfg)
        print(json.dumps(res), flush=True)
        results.append(res)
    out = {"runs": results}
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.one:
        CFG = json.loads(ARGS.one)
        print(json.dumps(sweep(CFG) if "nprobes" in CFG else one(CFG)))
    else:
        main(ARGS)
