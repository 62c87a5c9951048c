"""``diffmem probe``: where does memorisation live, and does mitigating it survive an attack?

``probe=trigger_search|nemo|wanda|locality|finding_dori`` (``diffmem.probes``). The memorised
prompts (``positives``, as in ``detect``) are the targets; each needs its training image
(testbed prompts carry it; a prompt list needs a ``target_file`` column, relative to
``data.root``). Non-memorised prompts give NeMo's activation statistics, the ``other``
trigger initialisation and, when they have a training image, the control targets. Writes to
the run dir one Parquet file per table the probe returns (``finding_dori.parquet``,
``triggers.parquet``, ...), ``metrics.json`` (with provenance), triggers and their generations (PNG) under ``triggers/``,
probe artefacts (``neurons.json``, ``masks.safetensors``, the pruned ``model/``), a figure,
and ``info.json`` + ``_SUCCESS`` last. A killed run re-run with the same config continues
from its finished parts (``parts/``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffmem.config import hydra_app
from diffmem.device import configure_torch
from diffmem.data import load_dataset
from diffmem.data.prompts import stage_prompts
from diffmem.data.selection import load_targets, select_prompts
from diffmem.errors import DataError
from diffmem.probes import PROBES
from diffmem.probes.context import ProbeContext, check_settings, rows_conditioning
from diffmem.report.figures import save_figure
from diffmem.runs import (check_claim, claim, config_subset, finish, is_done, provenance,
                          write_json, write_parquet)

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig):
    """The probe function, after checking the settings (nothing is written before this)."""
    fn = PROBES.get(cfg.probe.name)
    check_settings(cfg.probe.name, cfg.probe)
    return fn


def fingerprint(cfg: DictConfig) -> dict:
    return config_subset(cfg, ["model", "data", "prompts", "features", "probe", "seed", "resolution", "scheduler",
                               "steps", "guidance_scale", "n_per_prompt", "threshold", "mr_reduction",
                               "positives", "max_targets", "n_controls", "resize_targets"])


def figure(tables: dict, metrics: dict, path: Path, threshold: float) -> Path | None:
    """A bar chart of MR and similarity per row of the probe's summary (what people look at)."""
    from matplotlib.figure import Figure

    if "finding_dori" in tables:
        t = tables["finding_dori"]
        labels = [f"{m}\n{'attacked' if a.startswith('trigger') else 'as is'}"
                  + ("\n(control)" if "control" in a else "") for m, a in zip(t["model"], t["attack"])]
        mrs, sims = t["mr"].to_numpy(), t["similarity"].to_numpy()
    else:
        rows = {k: v for k, v in metrics.items() if isinstance(v, dict) and "mr" in v}
        if not rows:
            return None
        labels, mrs, sims = list(rows), [v["mr"] for v in rows.values()], [v["similarity"] for v in rows.values()]
    fig = Figure(figsize=(max(4.5, 1.6 * len(labels)), 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(labels))
    ax1.bar(x, mrs, color="#c44e52")
    ax1.set(ylim=(0, 1.05), ylabel="memorisation rate", xticks=x)
    ax1.set_xticklabels(labels, fontsize=7)
    ax2.bar(x, sims, color="#4c72b0")
    ax2.axhline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax2.set(ylabel="mean similarity to training image", xticks=x)
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.legend(frameon=False, fontsize=7)
    return save_figure(fig, path)


def run(cfg: DictConfig) -> Path:
    """Probe per ``cfg``; returns the run dir."""
    from diffmem.features import build_extractor
    from diffmem.loading import load_model
    from diffmem.distributed import single_process

    single_process("probe")  # its sampling is not split across ranks yet

    fn = check_config(cfg)
    root, manifest = load_dataset(cfg.data)
    prompts = stage_prompts(cfg, manifest)
    positives = OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None
    targets, negatives, controls = select_prompts(prompts, positives, cfg.get("max_targets"), cfg.n_controls)
    if len(negatives) < 2 and cfg.probe.name in ("nemo", "locality", "finding_dori"):
        raise DataError(f"probe {cfg.probe.name}: needs >= 2 non-memorised prompts (got {len(negatives)})")
    target_images = load_targets(root, targets, cfg.resolution, bool(cfg.resize_targets))
    control_images = load_targets(root, controls, cfg.resolution, bool(cfg.resize_targets))
    if check_claim(cfg.run_dir, fingerprint(cfg)) and is_done(cfg.run_dir):
        log.info("probe: %s is complete", cfg.run_dir)
        return Path(cfg.run_dir)
    device = configure_torch(cfg)
    pipe = load_model(cfg.model, device, scheduler=cfg.scheduler)
    extractor = build_extractor(cfg.features.extractor, device=str(device))
    run_dir = claim(cfg.run_dir, fingerprint(cfg))

    ctx = ProbeContext(
        pipe=pipe, extractor=extractor, targets=targets, target_images=target_images,
        target_cond=rows_conditioning(pipe, targets), negatives=negatives,
        negative_cond=rows_conditioning(pipe, negatives), controls=controls, control_images=control_images,
        control_cond=rows_conditioning(pipe, controls),
        run_dir=run_dir, seed=int(cfg.seed), resolution=int(cfg.resolution), steps=int(cfg.steps),
        guidance=float(cfg.guidance_scale), n_per_prompt=int(cfg.n_per_prompt), threshold=float(cfg.threshold),
        mr_reduction=str(cfg.mr_reduction), batch_size=int(cfg.batch_size))
    start = time.perf_counter()
    tables, metrics = fn(ctx, cfg.probe)
    seconds = time.perf_counter() - start
    for name, table in tables.items():
        write_parquet(run_dir / f"{name}.parquet", table)
    figure(tables, metrics, run_dir / "probe.png", float(cfg.threshold))
    write_json(run_dir / "metrics.json", {
        "probe": cfg.probe.name, "model": cfg.model.name, "n_targets": len(targets),
        "n_negatives": len(negatives), "n_controls": len(controls), "threshold": float(cfg.threshold),
        "features": extractor.info(), "seconds": seconds, **metrics, "provenance": provenance(cfg)})
    log.info("probe: %s on %d memorised prompts in %.0f s", cfg.probe.name, len(targets), seconds)
    return finish(run_dir, cfg, {"probe": cfg.probe.name, "n_targets": len(targets)})


main = hydra_app("probe", run)

if __name__ == "__main__":
    main()
