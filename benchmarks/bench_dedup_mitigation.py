#!/usr/bin/env python
"""Does training on the deduplicated testbed stop the copying? Memorisation figures of testbed models.

For each ``--model`` (a diffusers folder, e.g. a train run's ``model/``) or ``--checkpoint``
(a train run's UNet checkpoint folder ``checkpoints/unet/step-XXXXXXX``: the testbed
architecture of ``--seed`` with ``--vae`` and that checkpoint's UNet, for runs stopped before
their end), :func:`diffmem.metrics.memorisation.memorisation_figures` on the full testbed (its
ground truth: every canary of every duplication count, whatever the model was trained on),
with the recipe's evaluation settings (8 seeds, 25 DDIM steps, guidance 5: the same as the
shipped model's ``memorisation.json``). Prints and writes the copy share and median RMSE to
the prompt's own training image per kind and duplication count.

    python benchmarks/bench_dedup_mitigation.py --model diffmem/assets/testbed \\
        --model outputs/train/dedup/model --out /tmp/mitigation.json
"""

from __future__ import annotations

import argparse
import os
import sys

from diffmem.runs import write_json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", action="append", default=[], help="a diffusers model folder (repeatable)")
    p.add_argument("--checkpoint", action="append", default=[], help="a UNet checkpoint folder (repeatable)")
    p.add_argument("--vae", default="diffmem/assets/testbed/vae", help="the VAE of --checkpoint models")
    p.add_argument("--seed", type=int, default=0, help="the training seed (text encoder, architecture)")
    p.add_argument("--n-seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument(
        "--canaries-only",
        action="store_true",
        help="only the canary and template prompts (their generations are the same as in the full run)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/bench_dedup_mitigation.json")
    return p.parse_args(argv)


def checkpoint_pipeline(path: str, vae: str, seed: int):
    """The testbed pipeline of ``seed`` with ``vae`` and the UNet weights of checkpoint ``path``."""
    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from diffmem.config import CONF_DIR
    from diffmem.models.testbed import build_testbed_pipeline

    pipe = build_testbed_pipeline(OmegaConf.load(CONF_DIR / "arch" / "testbed.yaml"), seed=seed)
    pipe.vae = AutoencoderKL.from_pretrained(vae, use_safetensors=True)
    pipe.unet.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return pipe


def main(args) -> dict:
    import torch
    from omegaconf import OmegaConf

    from diffmem.config import CONF_DIR
    from diffmem.data import load_dataset
    from diffmem.loading import load_model
    from diffmem.metrics.memorisation import memorisation_figures

    torch.set_num_threads(args.threads)
    data = OmegaConf.load(CONF_DIR / "data" / "testbed.yaml")
    data.root = os.path.join(
        os.environ.get("DIFFMEM_CACHE", os.path.expanduser("~/.cache/diffmem")), "data", f"testbed-v2-{data.seed}"
    )
    root, manifest = load_dataset(data)
    out = {}
    for kind, path in [("model", m) for m in args.model] + [("checkpoint", c) for c in args.checkpoint]:
        pipe = load_model(path, "cpu") if kind == "model" else checkpoint_pipeline(path, args.vae, args.seed)
        others = {"n_ordinary": 0, "n_heldout": 0} if args.canaries_only else {}
        figures = memorisation_figures(pipe, root, manifest, n_seeds=args.n_seeds, steps=args.steps, **others)
        rows = [
            {k: r[k] for k in ("kind", "dup_count", "generations", "copy_share", "median_own_rmse", "median_nn_rmse")}
            for r in figures["summary"]
        ]
        out[path] = rows
        print(path)
        for r in rows:
            print(
                f"  {r['kind']:9s} x{r['dup_count']:<3d} copies {r['copy_share']}  median own RMSE "
                f"{r['median_own_rmse']}  median nearest RMSE {r['median_nn_rmse']:.3f}",
                flush=True,
            )
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main(parse_args())
