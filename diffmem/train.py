"""``diffmem train``: train a text-to-image model from scratch (the testbed) or fine-tune one.

The engine is :mod:`diffmem.training` (loss, resumable loop, VAE then UNet). Writes ``model/``
(diffusers format), ``train_log.parquet`` and ``info.json`` + ``_SUCCESS``; a killed run re-run
with the same config resumes exactly from ``checkpoints/``, removed once the run is published
(``keep_checkpoints=true`` keeps them).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from diffmem import distributed
from diffmem.config import hydra_app
from diffmem.data import load_dataset
from diffmem.data.datasets import TESTBED_KINDS
from diffmem.metrics.memorisation import memorisation_figures
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.training import CHECKPOINTS, drop_checkpoints, fit_items, train_pipeline, training_rows

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd


def prepare(cfg: DictConfig) -> tuple[Path, pd.DataFrame]:
    root, manifest = load_dataset(cfg.data)
    training_rows(root, manifest)
    return root, manifest


def body(job: Job) -> Outcome:
    """Train; with ``evaluate`` on a testbed, the model's memorisation figures go to
    ``model/memorisation.json``."""
    cfg = job.cfg
    testbed = cfg.get("evaluate") and cfg.data.kind in TESTBED_KINDS
    evaluate = partial(memorisation_figures, **cfg.evaluate) if testbed else None
    root, manifest = job.ctx
    model_dir = train_pipeline(cfg, job.dir, root, manifest, evaluate)
    phases = [c for c in (cfg.vae, cfg.unet) if int(c.steps) > 0]  # steps 0: a given VAE, not trained
    ranks = distributed.summary(lambda r, w: sum(fit_items(c, r, w) for c in phases))
    return Outcome({"model": str(model_dir)}, info={"data_parallel": ranks})


SPEC = StageSpec(
    "train",
    body,
    prepare,
    volatile=("keep_checkpoints", "unet.ckpt_every", "vae.ckpt_every"),
    inputs=lambda cfg, ctx: {"training set": training_rows(*ctx)[["file", "caption"]]},
    scratch=(CHECKPOINTS,),
    after=lambda job: drop_checkpoints(job.dir, bool(job.cfg.get("keep_checkpoints", False))),
    data_parallel=True,
)
run = SPEC.run
main = hydra_app("train", run)

if __name__ == "__main__":
    main()
