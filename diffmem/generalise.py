"""``diffmem generalise``: the memorisation -> generalisation transition (Kadkhodaie et al. 2024).

One job handles one training-set size ``n`` (``--multirun`` sweeps it): it trains, with the
train stage, two unconditional models on two
disjoint ``n``-image subsets of one dataset (``data.subset`` parts 0 and 1; seeds ``seed``
and ``seed + 1``; same architecture, one shared frozen VAE), both sample from the same initial
noises, and per noise we measure
(a) ``cross_sim``, the similarity of the two models' samples, and (b) ``nn_sim``, each
sample's similarity to the nearest training image of its own model's subset, both with the
``features`` descriptor. Small n: each model reproduces its own images (high nn_sim, low
cross_sim); large n: both learn the same score, so their samples agree (high cross_sim) and
are new images (lower nn_sim).

Unconditional: every caption is dropped in training (``caption_dropout`` 1, so the models
only ever see the empty prompt) and sampling uses the empty prompt with guidance 1.

``run_dir`` is the experiment folder shared by every n (also under ``--multirun``):
``n-<n>/{a,b}/train/`` (train stage run dirs), ``n-<n>/{a,b}/samples/*.png``,
``n-<n>/pairs.parquet`` (one row per noise), ``n-<n>/subsets.parquet``, ``n-<n>/pairs.png``,
``n-<n>/info.json`` + ``_SUCCESS``. Every job ends by rewriting, atomically, the summary of
every finished n: ``generalisation.parquet``, ``generalisation.png`` and ``summary.json``;
so after a sweep (in any order, or several sweeps in parallel) the last job leaves the
complete figure, and a finished n re-run only rewrites the summary.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from diffmem import train
from diffmem.config import hydra_app
from diffmem.data import load_dataset
from diffmem.device import configure_torch
from diffmem.errors import ConfigError
from diffmem.features.base import sha256_file
from diffmem.metrics.generalisation import HeldoutBaseline, measure, quartile_stats, transition_n
from diffmem.report.figures import GridPair, generalisation_figure, image_grid
from diffmem.runner import Job, Outcome, StageSpec, fingerprint
from diffmem.runs import (
    INFO,
    check_claim,
    claim,
    is_done,
    provenance,
    read_json,
    read_parquet,
    write_json,
    write_parquet,
)

log = logging.getLogger(__name__)
TABLE, FIGURE, SUMMARY = "generalisation.parquet", "generalisation.png", "summary.json"
MODELS = ("a", "b")
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def check_config(cfg: DictConfig) -> None:
    if not (Path(cfg.vae_path) / VAE_WEIGHTS).is_file():
        raise ConfigError(f"vae_path: no diffusers VAE ({VAE_WEIGHTS}) in {cfg.vae_path}")


def n_dir(run_dir: str | os.PathLike[str], n: int) -> Path:
    return Path(run_dir) / f"n-{int(n):05d}"


def train_config(cfg: DictConfig, part: int) -> DictConfig:
    """The train stage's config of model ``MODELS[part]``: subset part ``part``, seed ``seed + part``."""
    plain = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
    subset = {"kinds": plain["kinds"], "size": plain["n"], "part": part, "seed": plain["seed"]}
    return OmegaConf.create(
        {
            "run_dir": str(n_dir(cfg.run_dir, cfg.n) / MODELS[part] / "train"),
            "seed": plain["seed"] + part,
            "device": plain["device"],
            "threads": plain["threads"],
            "resolution": plain["resolution"],
            "data": {**plain["data"], "subset": subset},
            "arch": plain["arch"],
            "vae": {"steps": 0, "path": plain["vae_path"]},
            "unet": {**plain["unet"], "caption_dropout": 1.0},
            "save_dtype": "float32",
        }
    )


def summary_table(cfg: DictConfig) -> pd.DataFrame:
    """One row per finished n: mean and quartiles of cross_sim and nn_sim (both models'
    samples), the different-noise control, the held-out baseline and the VAE ceiling."""
    heldout_nn_sim, rows = HeldoutBaseline(cfg), []
    for d in sorted(p for p in Path(cfg.run_dir).glob("n-*") if is_done(p)):
        pairs = read_parquet(d / "pairs.parquet")
        rows.append(
            {
                "n": int(pairs.n.iloc[0]),
                "samples": len(pairs),
                **quartile_stats("cross_sim", pairs.cross_sim),
                **quartile_stats("nn_sim", np.concatenate([pairs.nn_sim_a, pairs.nn_sim_b])),
                "shuffled_sim": pairs.shuffled_sim.mean(),
                "heldout_nn_sim": heldout_nn_sim(d),
                "vae_ceiling": read_json(d / INFO)["vae_ceiling"],
            }
        )
    return pd.DataFrame(rows).sort_values("n", ignore_index=True)


def summarise(cfg: DictConfig) -> Path:
    """(Re)write the table, figure and ``summary.json`` from every finished n."""
    run_dir = Path(cfg.run_dir)
    table = summary_table(cfg)
    n_star = transition_n(table.n, table.cross_sim, table.nn_sim)
    write_parquet(run_dir / TABLE, table)
    generalisation_figure(table, n_star, run_dir / FIGURE, cfg.features.extractor.name)
    write_json(
        run_dir / SUMMARY,
        {
            "transition_n": n_star,
            "n": table.n.tolist(),
            "definition": " ".join(cast(str, transition_n.__doc__).split("\n\n")[0].split()),
            **provenance(cfg),
        },
    )
    return run_dir


def prepare(cfg: DictConfig) -> tuple[list, list]:
    """Both subsets' train configs and data (the dataset made), checked before anything is
    written; the experiment's folder must hold this experiment (every setting but n)."""
    if not (Path(cfg.vae_path) / VAE_WEIGHTS).is_file():
        raise ConfigError(f"vae_path: no diffusers VAE ({VAE_WEIGHTS}) in {cfg.vae_path}")
    check_claim(cfg.run_dir, experiment_fingerprint(cfg))
    configs = [train_config(cfg, part) for part in range(len(MODELS))]
    return configs, [load_dataset(c.data) for c in configs]


def experiment_fingerprint(cfg: DictConfig) -> dict:
    """What every n of one experiment shares (n excluded); the VAE by content."""
    return fingerprint(cfg, ("n", "batch_size"), {"vae_sha256": sha256_file(Path(cfg.vae_path) / VAE_WEIGHTS)})


def body(job: Job) -> Outcome:
    """Measure size ``cfg.n`` in its own folder ``n-<n>`` of the experiment."""
    cfg = job.cfg
    configure_torch(cfg)
    claim(cfg.run_dir, experiment_fingerprint(cfg))
    configs, parts = job.ctx
    vae_ceiling = measure(cfg, job.dir, configs, parts, train=train.run)
    pairs = read_parquet(job.dir / "pairs.parquet")
    image_grid(
        [GridPair(job.dir / p.file_a, job.dir / p.file_b, f"{p.cross_sim:.2f}") for p in pairs.head(8).itertuples()],
        job.dir / "pairs.png",
    )
    return Outcome({"n": int(cfg.n)}, {"vae_ceiling": vae_ceiling})


#: one run dir per n (a multirun over n fills one experiment); every job then rewrites the summary
SPEC = StageSpec(
    "generalise",
    body,
    prepare,
    volatile=("batch_size",),
    extra=lambda cfg, _: {"vae_sha256": sha256_file(Path(cfg.vae_path) / VAE_WEIGHTS)},
    run_dir=lambda cfg: n_dir(cfg.run_dir, cfg.n),
)


def run(cfg: DictConfig) -> Path:
    """Measure size ``cfg.n`` (skipped when already done), then rewrite the summary; returns run_dir."""
    SPEC.run(cfg)
    return summarise(cfg)


main = hydra_app("generalise", run)

if __name__ == "__main__":
    main()
