"""Cost of detecting memorised prompts without the training set vs by generation + retrieval.

In one run, on the same model and prompts (the testbed's canaries, ordinary and held-out
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

import torch

import diffmem
from diffmem.data import load_dataset, load_images, load_prompts
from diffmem.detectors import build_detector, count_unet_evals
from diffmem.features import build_extractor
from diffmem.data.samples import plan_samples
from diffmem.sampling import generate_images
from diffmem.index import build_index, search
from diffmem.data.labels import ground_truth_labels
from diffmem.metrics.detection import roc_auc
from diffmem.models import load_pipeline
from diffmem.runs import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-per-prompt", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/bench_detect.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = diffmem.compose("detect")
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
            generate_images(pipe, plan, Path(tmp), resolution=res, steps=int(cfg.model.num_inference_steps),
                            guidance=float(cfg.model.guidance_scale), batch_size=32, desc="generate")
        gens = torch.from_numpy(load_images(tmp, plan["file"])).permute(0, 3, 1, 2).float() / 255
        sims, _ = search(index, extractor(gens).numpy(), k=1)
        sec_b = time.perf_counter() - t0
    gen_scores = sims[:, 0].reshape(len(prompts), args.n_per_prompt).max(axis=1)

    y = labels.to_numpy()[known].astype(int)
    result = {
        "prompts": len(prompts), "n_per_prompt": args.n_per_prompt, "threads": args.threads,
        "noise_norm": {"unet_evals": used_a.evals, "seconds": sec_a, "roc_auc": roc_auc(scores[known], y),
                       "settings": detector.settings()},
        "generation_retrieval": {"unet_evals": used_b.evals, "seconds": sec_b,
                                 "roc_auc": roc_auc(gen_scores[known], y), "features": extractor.info()["name"]},
    }
    result["compute_ratio"] = used_b.evals / used_a.evals
    result["time_ratio"] = sec_b / sec_a
    result["pass"] = bool(result["compute_ratio"] >= 50)
    print(json.dumps(result, indent=2, default=float))
    print(f"generation+retrieval / noise_norm: {result['compute_ratio']:.0f}x UNet evaluations, "
          f"{result['time_ratio']:.0f}x wall time (target >= 50x compute): {'PASS' if result['pass'] else 'FAIL'}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
