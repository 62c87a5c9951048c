"""Detection benchmark: every detector on both testbeds, with bootstrap intervals.

Default (``python benchmarks/bench_detect.py``): each detector of :data:`SUITE` (the shipped
ones at their defaults, and the settings the issue asked about) scores the testbed prompts of
``model=testbed`` and ``model=testbed_photo`` (canaries, templates, ``--n-ordinary`` ordinary
and ``--n-heldout`` held-out captions). Reports ROC-AUC and TPR@1%FPR (canaries >= 16x vs
ordinary + held-out), the hard-negative AUC (>= 16x vs the 1x / 4x canaries trained on and not
copied: none of the model's 8 evaluation generations in its ``memorisation.json`` is a copy;
copied ones are left out) each with a stratified 95 % bootstrap interval over prompts, and UNet evaluations per
prompt (fixed by the settings: no interval). Scores are kept per (testbed, detector) under
``--out``'s folder (or ``--scores``), so a rerun only scores what is missing. Writes a JSON, a markdown table and
one figure of ROC curves (a panel per testbed, a curve per detector).

``--extra testbed:<model dir>:<data seed>`` (repeatable) adds a model trained by a testbed's
recipe on another data seed: it is scored on its own seed's prompts and ground truth, and a
second table pools it with the shipped model (:func:`pooled_metrics`); the shipped models'
table stays as it is. A subset pooled apart from the full table::

    python benchmarks/bench_detect.py --only noise_ssim flipd --extra testbed:<dir>:1 \\
        --out benchmarks/results/bench_detect_pooled.json --scores benchmarks/results/bench_detect_suite \\
        --figure /tmp/pooled_roc.png

``--vs-retrieval``: the cost of detecting memorised prompts without the training set vs by
generation + retrieval. In one run, on the same model and prompts (the testbed's canaries, ordinary and held-out
captions): (a) the ``noise_norm`` detector at its default (first step, one generation);
(b) the generation-based route the audit takes: ``n_per_prompt`` generations per prompt
with the full sampler, descriptors of every generation, exact search against the training
set's descriptors (built beforehand, not timed: it is shared by every audit). Counts UNet
evaluations (a guided step of one sample = 2) and wall time of both, and the ROC-AUC of
both against the testbed's ground truth (canaries >= 16x vs ordinary + held-out).
Prints the ratios (b)/(a); target >= 50 in model compute.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

import diffmem
from diffmem.data import load_dataset, load_images, load_prompts
from diffmem.data.labels import ground_truth, ground_truth_labels
from diffmem.data.samples import plan_samples
from diffmem.detectors import build_detector, count_unet_evals
from diffmem.features import build_extractor
from diffmem.index import build_index, search
from diffmem.metrics.detection import detection_metrics, roc_auc, roc_points
from diffmem.metrics.memorisation import with_copy_shares
from diffmem.models import load_pipeline
from diffmem.report.figures import save_figure
from diffmem.runs import write_json, write_parquet
from diffmem.sampling import generate_images

#: (label, detect overrides): the detectors at their defaults, then the settings issue 26 asks about
SUITE = [  # cheapest first
    ("noise_norm", ["detect=noise_norm"]),
    ("attention_entropy", ["detect=attention_entropy"]),
    ("noise_norm n_gen=4", ["detect=noise_norm", "detect.n_generations=4"]),
    ("one_step", ["detect=one_step"]),
    ("noise_ssim", ["detect=noise_ssim"]),
    ("noise_norm steps=[0,1] n_gen=4", ["detect=noise_norm", "detect.steps=[0,1]", "detect.n_generations=4"]),
    ("bright_ending", ["detect=bright_ending"]),
    ("noise_norm steps=all", ["detect=noise_norm", "detect.steps=all"]),
    ("flipd", ["detect=flipd"]),
]
TESTBEDS = ("testbed", "testbed_photo")


def score_suite(
    model: str, labels: list[str], n_ordinary: int, n_heldout: int, folder: Path, overrides: list[str] | None = None
) -> dict:
    """Score (or load) every detector of ``labels`` on ``model``; ``{label: scores table}``.

    ``model`` names the shipped testbed (``model=`` and ``data=``) and the cached files, unless
    ``overrides`` select the model and data instead (another data seed's model)."""
    import pandas as pd

    from diffmem.data.prompts import stage_prompts
    from diffmem.loading import load_model

    picked = overrides if overrides is not None else [f"model={model}", f"data={model}"]
    base = [*picked, f"prompts.n_ordinary={n_ordinary}", f"prompts.n_heldout={n_heldout}"]
    cfg = diffmem.compose("detect", base)
    prompts = with_copy_shares(stage_prompts(cfg), cfg.model.path)  # as detect: copied rare canaries left out
    positives = OmegaConf.to_container(cfg.positives, resolve=True)
    gt = ground_truth(prompts, positives["min_dup_count"])
    truth = {
        "label": ground_truth_labels(prompts, positives).to_numpy(),
        "hard_negative": gt["hard_negative"].to_numpy(),
    }
    out, pipe = {}, None
    for label in labels:
        path = folder / f"{model}--{label.replace(' ', '_').replace('=', '-')}.parquet"
        if path.exists():  # cached scores; the ground truth is today's
            table = pd.read_parquet(path)
            assert table["prompt_id"].tolist() == prompts["prompt_id"].tolist(), path
            table = table.assign(**truth)
        else:
            pipe = pipe or load_model(cfg.model, torch.device("cpu"), scheduler=cfg.scheduler)
            detector = build_detector(diffmem.compose("detect", base + dict(SUITE)[label]).detect)
            t0 = time.perf_counter()
            with count_unet_evals(pipe.unet) as used:
                scores = detector.score(
                    pipe, prompts["caption"].tolist(), prompts["prompt_id"].tolist(), resolution=int(cfg.resolution)
                )
            table = pd.DataFrame(
                {
                    "prompt_id": prompts["prompt_id"],
                    "score": scores,
                    **truth,
                    "evals_per_prompt": used.evals / len(prompts),
                    "seconds_per_prompt": (time.perf_counter() - t0) / len(prompts),
                }
            )
            write_parquet(path, table)
        out[label] = table
        print(
            f"{model} / {label}: {len(table)} prompts, {table['evals_per_prompt'].iloc[0]:g} UNet evals/prompt",
            flush=True,
        )
    return out


def suite_metrics(table, fpr: float = 0.01) -> dict:
    """AUC and TPR@fpr (memorised vs not) and the hard-negative AUC, each with a 95 % bootstrap CI."""
    known = table[table["label"].notna()]
    main = detection_metrics(known["score"], known["label"].astype(int), fpr=fpr, ci_level=0.95)
    hard = table[(table["label"] == 1) | table["hard_negative"]]
    hn = detection_metrics(hard["score"], hard["label"].eq(1).astype(int), fpr=fpr, ci_level=0.95)
    return {
        **main,
        "hard_roc_auc": hn["roc_auc"],
        "hard_roc_auc_ci": hn["roc_auc_ci"],
        "n_hard": hn["n_neg"],
        "evals_per_prompt": float(table["evals_per_prompt"].iloc[0]),
        "seconds_per_prompt": float(table["seconds_per_prompt"].iloc[0]),
    }


def parse_extra(spec: str) -> tuple[str, Path, int]:
    """``testbed:<model dir>:<data seed>`` -> (testbed, model dir, data seed), checked."""
    testbed, _, rest = spec.partition(":")
    path, _, seed = rest.rpartition(":")
    if testbed not in TESTBEDS or not path or not seed.lstrip("-").isdigit():
        raise SystemExit(f"--extra {spec!r}: expected <{'|'.join(TESTBEDS)}>:<model dir>:<data seed>")
    if not (Path(path) / "model_index.json").is_file():
        raise SystemExit(f"--extra {spec!r}: {path} is not a diffusers model folder (no model_index.json)")
    return testbed, Path(path).resolve(), int(seed)


def score_extra(spec: str, labels: list[str], n_ordinary: int, n_heldout: int, folder: Path) -> tuple[str, dict]:
    """Score another data seed's model (``--extra``) on its own seed's prompts and ground truth."""
    import hashlib

    testbed, path, seed = parse_extra(spec)
    key = f"{testbed}-seed{seed}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    overrides = ["model=local", f"model.path={path}", f"data={testbed}", f"data.seed={seed}"]
    return testbed, score_suite(key, labels, n_ordinary, n_heldout, folder, overrides)


def pooled_metrics(tables: list, fpr: float = 0.01, level: float = 0.95, n_boot: int = 2000) -> dict:
    """:func:`suite_metrics` pooled over models (one scores table each), pairs formed within a model.

    Scores of different models are on different scales and a user thresholds one model, so the
    pooled AUC is the share of (positive, negative) pairs of the *same* model ranked right (each
    model's AUC weighted by its pairs), and the pooled TPR the share of all positives above their
    own model's threshold at ``fpr``. The bootstrap resamples positives and negatives within each
    model (stratified by model and class; :func:`~diffmem.metrics.detection.bootstrap_replicates`,
    seed = the model's position) and pools every replicate the same way.
    """
    from diffmem.metrics.detection import bootstrap_replicates, tpr_at_fpr

    def pool(parts: list[tuple[np.ndarray, np.ndarray]], key: str) -> tuple[float, list[float]]:
        """Weighted mean of each model's ``key`` (AUC: by its pairs; TPR: by its positives), point and replicates."""
        w = np.array([y.sum() * ((y == 0).sum() if key == "roc_auc" else 1) for _, y in parts], dtype=float)
        point = [roc_auc(s, y) if key == "roc_auc" else tpr_at_fpr(s, y, fpr) for s, y in parts]
        reps = np.stack([bootstrap_replicates(s, y, fpr, n_boot, seed=i)[key] for i, (s, y) in enumerate(parts)])
        tail = 100 * (1 - level) / 2
        lo_hi = np.percentile(w @ reps / w.sum(), [tail, 100 - tail])
        return float(w @ np.array(point) / w.sum()), [float(v) for v in lo_hi]

    main, hard = [], []
    for table in tables:
        known = table[table["label"].notna()]
        main.append((known["score"].to_numpy(), known["label"].astype(int).to_numpy()))
        pick = table[(table["label"] == 1) | table["hard_negative"]]
        hard.append((pick["score"].to_numpy(), pick["label"].eq(1).astype(int).to_numpy()))
    auc, auc_ci = pool(main, "roc_auc")
    tpr, tpr_ci = pool(main, "tpr_at_fpr")
    hard_auc, hard_ci = pool(hard, "roc_auc")
    return {
        "roc_auc": auc,
        "roc_auc_ci": auc_ci,
        "tpr_at_fpr": tpr,
        "tpr_at_fpr_ci": tpr_ci,
        "fpr": fpr,
        "hard_roc_auc": hard_auc,
        "hard_roc_auc_ci": hard_ci,
        "models": len(tables),
        "n_pos": int(sum(y.sum() for _, y in main)),
        "n_neg": int(sum((y == 0).sum() for _, y in main)),
        "n_hard": int(sum((y == 0).sum() for _, y in hard)),
        "evals_per_prompt": float(tables[0]["evals_per_prompt"].iloc[0]),
    }


def markdown(results: dict) -> str:
    def cell(m, key):
        lo, hi = m[f"{key}_ci"]
        return f"{m[key]:.3f} [{lo:.2f}, {hi:.2f}]"

    head = (
        "| detector | UNet evals / prompt | "
        + " | ".join(f"{tb}: AUC | {tb}: TPR@1%FPR | {tb}: hard-neg. AUC" for tb in TESTBEDS)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 + 3 * len(TESTBEDS))]
    for label in results[TESTBEDS[0]]:
        ms = [results[tb][label] for tb in TESTBEDS]
        lines.append(
            f"| `{label}` | {ms[0]['evals_per_prompt']:g} | "
            + " | ".join(f"{cell(m, 'roc_auc')} | {cell(m, 'tpr_at_fpr')} | {cell(m, 'hard_roc_auc')}" for m in ms)
            + " |"
        )
    return "\n".join(lines)


def markdown_pooled(pooled: dict) -> str:
    """The pooled table: per testbed and detector, the pooled metrics and the models they pool.

    The last column extrapolates how many models the hard-negative interval needs to shrink to
    +-0.05, from its measured half-width ``h`` over ``n`` models as ``n (h / 0.05)^2`` (widths
    scale about as 1 / sqrt(prompts))."""

    def cell(m, key):
        lo, hi = m[f"{key}_ci"]
        return f"{m[key]:.3f} [{lo:.2f}, {hi:.2f}]"

    lines = [
        "| testbed | detector | models | memorised / negatives / hard neg. | AUC | TPR@1%FPR | hard-neg. AUC "
        "| models for hard-neg. +-0.05 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tb, by_label in pooled.items():
        for label, m in by_label.items():
            half = (m["hard_roc_auc_ci"][1] - m["hard_roc_auc_ci"][0]) / 2
            need = int(np.ceil(m["models"] * (half / 0.05) ** 2)) if half > 0.05 else m["models"]
            lines.append(
                f"| {tb} | `{label}` | {m['models']} | {m['n_pos']} / {m['n_neg']} / {m['n_hard']} | "
                f"{cell(m, 'roc_auc')} | {cell(m, 'tpr_at_fpr')} | {cell(m, 'hard_roc_auc')} | {need} |"
            )
    return "\n".join(lines)


def roc_figure(tables: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(tables), 4.2), layout="constrained")
    for ax, (model, by_label) in zip(fig.subplots(1, len(tables)), tables.items()):
        for label, table in by_label.items():
            known = table[table["label"].notna()]
            f, t, _ = roc_points(known["score"], known["label"].astype(int))
            ax.plot(f, t, linewidth=1.5, label=f"{label} ({roc_auc(known['score'], known['label'].astype(int)):.3f})")
        ax.plot([0, 1], [0, 1], color="#7f7f7f", linestyle="--", linewidth=1)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.01),
            xlabel="false positive rate",
            ylabel="true positive rate",
            title=f"{model}: {int(known['label'].sum())} memorised vs {int((known['label'] == 0).sum())} not",
        )
        ax.legend(loc="lower right", fontsize=7, frameon=False)
    return save_figure(fig, path)


def benchmark(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    folder = Path(args.scores) if args.scores else out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    labels = [lab for lab, _ in SUITE if not args.only or lab in args.only]
    tables = {tb: score_suite(tb, labels, args.n_ordinary, args.n_heldout, folder) for tb in TESTBEDS}
    results = {tb: {lab: suite_metrics(t) for lab, t in by.items()} for tb, by in tables.items()}
    table = markdown(results)
    extras: dict[str, list] = {}
    for spec in args.extra:
        testbed, by_label = score_extra(spec, labels, args.n_ordinary, args.n_heldout, folder)
        extras.setdefault(testbed, []).append((spec, by_label))
    pooled = {
        tb: {lab: pooled_metrics([tables[tb][lab], *(by[lab] for _, by in extras[tb])]) for lab in labels}
        for tb in extras
    }
    if pooled:
        table += "\n\nPooled over data seeds (the shipped model and --extra):\n\n" + markdown_pooled(pooled)
    print(table)
    write_json(
        out,
        {
            "n_ordinary": args.n_ordinary,
            "n_heldout": args.n_heldout,
            "threads": args.threads,
            "bootstrap": "stratified percentile, 2000 resamples, seed 0",
            "results": results,
            "extra": args.extra,
            "pooled": pooled,
        },
    )
    out.with_suffix(".md").write_text(table + "\n")
    print("figure:", roc_figure(tables, Path(args.figure)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vs-retrieval", action="store_true", help="the cost comparison with generation + retrieval")
    ap.add_argument("--n-per-prompt", type=int, default=4, help="--vs-retrieval: generations per prompt")
    ap.add_argument("--n-ordinary", type=int, default=64)
    ap.add_argument("--n-heldout", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="detector labels of SUITE to run (default: all)")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="TESTBED:MODEL_DIR:DATA_SEED",
        help="another data seed's model of a testbed, scored on its own seed's prompts and pooled with the shipped one",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--figure", default="docs/figures/detect_benchmark_roc.png")
    ap.add_argument("--out", default=None)
    ap.add_argument("--scores", default=None, help="folder of cached per-prompt scores (default: --out without .json)")
    args = ap.parse_args()
    if not args.vs_retrieval:
        args.out = args.out or "benchmarks/results/bench_detect_suite.json"
        return benchmark(args)
    args.out = args.out or "benchmarks/results/bench_detect.json"
    torch.set_num_threads(args.threads)
    cfg = diffmem.compose("detect", ["detect=noise_norm"])
    pipe = load_pipeline(cfg.model.path, scheduler=cfg.scheduler)
    root, manifest = load_dataset(cfg.data)
    prompts = load_prompts(cfg.prompts, manifest)
    labels = ground_truth_labels(prompts, cfg.positives)
    known = labels.notna().to_numpy()
    res = int(cfg.resolution)

    detector = build_detector(cfg.detect)
    t0 = time.perf_counter()
    with count_unet_evals(pipe.unet) as used_a:
        scores = detector.score(pipe, prompts["caption"].tolist(), prompts["prompt_id"].tolist(), resolution=res)
    sec_a = time.perf_counter() - t0

    extractor = build_extractor(diffmem.compose("audit").features.extractor)
    train = manifest[manifest["split"] == "train"].drop_duplicates("file")
    real = torch.from_numpy(load_images(root, train["file"], res)).permute(0, 3, 1, 2).float() / 255
    index = build_index(extractor(real).numpy(), factory="Flat")
    plan = plan_samples(prompts, args.n_per_prompt, 0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with count_unet_evals(pipe.unet) as used_b:
            generate_images(
                pipe,
                plan,
                Path(tmp),
                resolution=res,
                steps=int(cfg.model.num_inference_steps),
                guidance=float(cfg.model.guidance_scale),
                batch_size=32,
                desc="generate",
            )
        gens = torch.from_numpy(load_images(tmp, plan["file"])).permute(0, 3, 1, 2).float() / 255
        sims, _ = search(index, extractor(gens).numpy(), k=1)
        sec_b = time.perf_counter() - t0
    gen_scores = sims[:, 0].reshape(len(prompts), args.n_per_prompt).max(axis=1)

    y = labels.to_numpy()[known].astype(int)
    result = {
        "prompts": len(prompts),
        "n_per_prompt": args.n_per_prompt,
        "threads": args.threads,
        "noise_norm": {
            "unet_evals": used_a.evals,
            "seconds": sec_a,
            "roc_auc": roc_auc(scores[known], y),
            "settings": detector.settings(),
        },
        "generation_retrieval": {
            "unet_evals": used_b.evals,
            "seconds": sec_b,
            "roc_auc": roc_auc(gen_scores[known], y),
            "features": extractor.info()["name"],
        },
    }
    result["compute_ratio"] = used_b.evals / used_a.evals
    result["time_ratio"] = sec_b / sec_a
    result["pass"] = bool(result["compute_ratio"] >= 50)
    print(json.dumps(result, indent=2, default=float))
    print(
        f"generation+retrieval / noise_norm: {result['compute_ratio']:.0f}x UNet evaluations, "
        f"{result['time_ratio']:.0f}x wall time (target >= 50x compute): {'PASS' if result['pass'] else 'FAIL'}"
    )
    write_json(args.out, result)


if __name__ == "__main__":
    main()
