"""``diffmem train``: train a text-to-image model from scratch (the testbed) or fine-tune one.

The engine is :mod:`diffmem.training` (loss, resumable loop, VAE then UNet); this stage runs
it on a composed ``train`` config. Writes ``model/`` (diffusers format), ``train_log.parquet``
and ``info.json`` + ``_SUCCESS``; a killed run re-run with the same config resumes exactly.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from diffmem.config import hydra_app
from diffmem.data.images import TESTBED_KINDS
from diffmem.metrics.memorisation import memorisation_figures
from diffmem.training import train_model


def run(cfg: DictConfig) -> Path:
    """Train per ``cfg``; returns the run dir (the model is ``<run dir>/model``). With
    ``evaluate`` on a testbed, the model's memorisation figures go to ``model/memorisation.json``."""
    testbed = cfg.get("evaluate") and cfg.data.kind in TESTBED_KINDS
    return train_model(cfg, partial(memorisation_figures, **cfg.evaluate) if testbed else None)


main = hydra_app("train", run)

if __name__ == "__main__":
    main()
