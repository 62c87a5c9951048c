"""``diffmem probe``: where does memorisation live, and does mitigating it survive an attack?

``probe=trigger_search|nemo|wanda|locality|finding_dori`` (``diffmem.probes``). The memorised
prompts (``positives``, as in ``detect``) are the targets; each needs its training image
(testbed prompts carry it; a prompt list needs a ``target_file`` column, relative to
``data.root``). Non-memorised prompts give NeMo's activation statistics, the ``other``
trigger initialisation and, when they have a training image, the control targets. Writes to
the run dir one Parquet file per table the probe returns (``finding_dori.parquet``,
``triggers.parquet``, ...), ``metrics.json`` (with provenance), triggers and their generations
(PNG) under ``triggers/``,
probe artefacts (``neurons.json``, ``masks.safetensors``, the pruned ``model/``), a figure,
and ``info.json`` + ``_SUCCESS`` last. A killed run re-run with the same config continues
from its finished parts (``parts/``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, OmegaConf

from diffmem import distributed
from diffmem.config import hydra_app
from diffmem.data import load_dataset
from diffmem.data.prompts import stage_prompts
from diffmem.data.selection import load_targets, select_prompts
from diffmem.device import configure_torch
from diffmem.errors import DataError
from diffmem.probes import PROBES
from diffmem.probes.context import ProbeContext, check_settings
from diffmem.report.figures import probe_figure
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.runs import write_parquet

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> Callable[..., Any]:
    """The probe function, after checking the settings (nothing is written before this)."""
    fn = PROBES.get(cfg.probe.name)
    check_settings(cfg.probe.name, cfg.probe)
    return fn


def prepare(
    cfg: DictConfig,
) -> tuple[Callable[..., Any], pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, torch.Tensor, torch.Tensor]:
    """The probe function, the data, the prompts and the target images, checked before anything is written."""
    fn = check_config(cfg)
    root, manifest = load_dataset(cfg.data)
    prompts = stage_prompts(cfg, manifest)
    positives = cast(
        "dict[str, Any] | None", OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None
    )
    targets, negatives, controls = select_prompts(prompts, positives, cfg.get("max_targets"), cfg.n_controls)
    if len(negatives) < 2 and cfg.probe.name in ("nemo", "locality", "finding_dori"):
        raise DataError(f"probe {cfg.probe.name}: needs >= 2 non-memorised prompts (got {len(negatives)})")
    target_images = load_targets(root, targets, cfg.resolution, bool(cfg.resize_targets))
    control_images = load_targets(root, controls, cfg.resolution, bool(cfg.resize_targets))
    return fn, prompts, targets, negatives, controls, target_images, control_images


def body(job: Job) -> Outcome:
    from diffmem.features import build_extractor
    from diffmem.loading import load_model

    cfg, run_dir = job.cfg, job.dir
    fn, _, targets, negatives, controls, target_images, control_images = job.ctx
    device = configure_torch(cfg)
    pipe = load_model(cfg.model, device, scheduler=cfg.scheduler)
    extractor = build_extractor(cfg.features.extractor, device=str(device))
    ctx = ProbeContext.build(
        pipe, extractor, (targets, target_images, negatives, controls, control_images), run_dir, cfg
    )
    start = time.perf_counter()
    with distributed.split():  # each rank takes a share of the generations, restarts and targets
        tables, metrics = fn(ctx, cfg.probe)
        data_parallel = distributed.dealt_summary()
    seconds = time.perf_counter() - start
    if not distributed.is_main():  # rank 0 publishes
        return Outcome(complete=False)
    for name, table in tables.items():
        write_parquet(run_dir / f"{name}.parquet", table)
    probe_figure(tables, metrics, run_dir / "probe.png", float(cfg.threshold))
    log.info("probe: %s on %d memorised prompts in %.0f s", cfg.probe.name, len(targets), seconds)
    return Outcome(
        {"probe": cfg.probe.name, "n_targets": len(targets)},
        {"data_parallel": data_parallel},
        {
            "probe": cfg.probe.name,
            "model": cfg.model.name,
            "n_targets": len(targets),
            "n_negatives": len(negatives),
            "n_controls": len(controls),
            "threshold": float(cfg.threshold),
            "features": extractor.info(),
            "seconds": seconds,
            **metrics,
        },
    )


#: generations per batch do not change results (tests/test_probe.py)
SPEC = StageSpec(
    "probe",
    body,
    prepare,
    volatile=("batch_size",),
    inputs=lambda cfg, ctx: {"prompt list": ctx[1]},
    data_parallel=True,
)
run = SPEC.run
main = hydra_app("probe", run)

if __name__ == "__main__":
    main()
