#!/usr/bin/env python
"""Copy-detection benchmark: every descriptor on natural photos and their edited copies.

The set (``diffmem.features.copyset``, shared with ``tests/test_sscd_onnx.py``): the 19
photos scikit-image ships and matplotlib's Grace Hopper, one copy per edit family of the
SSCD / DISC evaluation (crop, down-scale + JPEG, blur, rotation, colour jitter, blend with
another photo, text overlay, flip). Every original is scored against every copy: positives
are (original, its own copy), negatives (original, another photo's copy).

For each descriptor (its ``conf/features`` defaults: pixel, CLIP with random weights,
sscd_onnx, sscd_distilled, and the TorchScript sscd_disc_mixup when its file is in the
cache): ROC-AUC, precision / recall of ``cosine > t`` at the published thresholds 0.5
(replication) and 0.75 (~90 % precision on DISC for sscd_disc_mixup), the positive and
negative medians, throughput over the set (images/s) and the batch-1 latency on a
288 x 288 image, all with ``--threads`` threads.

    python benchmarks/bench_copy_detection.py
    python benchmarks/bench_copy_detection.py --descriptors sscd_distilled,pixel --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--descriptors",
        default="pixel,clip,sscd_onnx,sscd_distilled,sscd_disc_mixup",
        help="feature configs to run (sscd_disc_mixup is skipped when its file is absent)",
    )
    p.add_argument("--max-side", type=int, default=512, help="photos' long side (pixels)")
    p.add_argument("--thresholds", default="0.5,0.75")
    p.add_argument("--latency-repeats", type=int, default=10, help="batch-1 runs (median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch / onnxruntime / BLAS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/bench_copy_detection.json")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread counts must be fixed before numpy / torch load BLAS
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import diffmem  # noqa: E402
from diffmem.data.photos import OTHER_PHOTOS, PHOTOS, natural_photos  # noqa: E402
from diffmem.errors import DataError  # noqa: E402
from diffmem.features import build_extractor  # noqa: E402
from diffmem.features.copyset import build_copy_set, embed_arrays  # noqa: E402
from diffmem.metrics.detection import detection_metrics  # noqa: E402
from diffmem.runs import write_json  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def latency_ms(ext, repeats: int) -> float:
    """Median milliseconds to embed one 288 x 288 image (batch 1), after one warm-up run."""
    x = torch.rand(1, 3, 288, 288)
    ext(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        ext(x)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


#: Per-descriptor overrides: no pretrained CLIP file is reachable offline, so CLIP runs with
#: random weights, which it then records in its info.
OVERRIDES = {"clip": ["features.extractor.pretrained=random"]}


def extractor(name: str):
    """The extractor of ``features=<name>`` as the bench runs it; None (logged) for Meta's
    TorchScript SSCD when its file, the user's to download, is absent."""
    cfg = diffmem.compose("embed", [f"features={name}", "device=cpu", *OVERRIDES.get(name, [])])
    try:
        return build_extractor(cfg.features.extractor, device="cpu")
    except DataError as err:
        if name.startswith("sscd_disc"):
            log(f"{name}: skipped ({err})")
            return None
        raise


def run_descriptor(name: str, cs, thresholds, repeats: int) -> dict | None:
    ext = extractor(name)
    if ext is None:
        return None
    t = time.perf_counter()
    a = embed_arrays(ext, cs.originals)
    b = embed_arrays(ext, cs.copies)
    seconds = time.perf_counter() - t
    scores = a @ b.T
    labels = cs.labels()
    out = {
        "descriptor": name,
        "dim": ext.dim,
        **detection_metrics(scores.ravel(), labels.ravel(), thresholds=thresholds),
        "images_per_s": (len(a) + len(b)) / seconds,
        "latency_ms_288": latency_ms(ext, repeats),
        "extractor": ext.info(),
    }
    fam = np.asarray(cs.copy_family)
    pos = scores[cs.copy_source, np.arange(len(b))]
    out["by_family"] = {
        f: {"positive_min": float(pos[fam == f].min()), "positive_median": float(np.median(pos[fam == f]))}
        for f in dict.fromkeys(fam)
    }
    return out


def table(rows: list[dict], thresholds) -> str:
    head = (
        ["descriptor", "ROC-AUC"]
        + [f"{m}@{t}" for t in thresholds for m in ("P", "R")]
        + ["pos. median", "neg. median", "images/s", "ms/image (288 px)"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pr = [r[f"{m}@{t}"] for t in thresholds for m in ("precision", "recall")]
        cells = (
            [f"`{r['descriptor']}`", f"{r['roc_auc']:.3f}"]
            + ["-" if v is None else f"{v:.2f}" for v in pr]
            + [
                f"{r['positive_median']:.2f}",
                f"{r['negative_median']:.2f}",
                f"{r['images_per_s']:.1f}",
                f"{r['latency_ms_288']:.1f}",
            ]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    cs = build_copy_set(natural_photos(PHOTOS + OTHER_PHOTOS, max_side=args.max_side), seed=args.seed)
    log(
        f"set: {len(cs.originals)} photos, {len(cs.copies)} copies ({len(set(cs.copy_family))} families), "
        f"{int(cs.labels().sum())} positive and {int((~cs.labels()).sum())} negative pairs; {args.threads} thread(s)"
    )
    rows = []
    for name in args.descriptors.split(","):
        r = run_descriptor(name, cs, thresholds, args.latency_repeats)
        if r is not None:
            rows.append(r)
            log(f"{name}: AUC {r['roc_auc']:.4f}, {r['images_per_s']:.1f} images/s, {r['latency_ms_288']:.1f} ms/image")
    text = table(rows, thresholds)
    log(text)
    result = {
        "photos": cs.names,
        "families": list(dict.fromkeys(cs.copy_family)),
        "threads": args.threads,
        "max_side": args.max_side,
        "seed": args.seed,
        "thresholds": thresholds,
        "results": rows,
        "table": text,
    }
    write_json(args.out, result)
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(ARGS)
