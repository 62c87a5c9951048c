"""``diffmem evaluate-mitigation``: the three-axis verdict on mitigated models, in one table.

For every model in ``models`` (diffusers folders or defence wrappers; the first is usually
the unmitigated one): memorisation on the original memorised prompts (MR and mean similarity
of ``n_per_prompt`` generations to the training image), memorisation **under trigger search**
(Finding Dori's attack against that model, ``trigger`` budget), and utility (Fréchet distance
of generations for ``utility`` captions to their real images, relative to ``reference``,
diversity, and with ``utility.clip`` (open_clip weights) CLIPScore prompt alignment).
With ``study`` (MemControl's Optuna storage) it adds the Pareto front of the study
with the fine-tuning runs in ``pareto_runs`` (their ``objectives.json``) as one figure.

Writes ``mitigations.parquet``, ``metrics.json`` (with provenance), ``mitigations.png``,
``pareto.parquet`` + ``pareto.png`` (with ``study``), and per model its parts under
``models/<name>-<digest>/`` (or ``parts_dir``; the digest covers the model's path and every
setting, so a killed run re-run continues from them and other tables reuse them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from diffmem import distributed
from diffmem.config import hydra_app
from diffmem.data import load_dataset, load_unit_images
from diffmem.data.prompts import stage_prompts
from diffmem.device import configure_torch
from diffmem.errors import ConfigError, DataError
from diffmem.mitigations.evaluation import evaluate_model, pareto_points
from diffmem.report.figures import mitigation_figure, pareto_figure
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.runs import digest, write_parquet

if TYPE_CHECKING:
    from diffmem.features.clip import ClipExtractor

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> dict:
    """``{name: model path}`` after checking the settings (nothing is written before this)."""
    from diffmem.probes.context import check_settings

    models = cast("dict[str, Any]", OmegaConf.to_container(cfg.models, resolve=True) or {})
    if not models:
        raise ConfigError("models: name at least one model folder (name: path)")
    for name, path in models.items():
        if not Path(str(path)).expanduser().exists():
            raise DataError(f"models.{name}: {path} does not exist")
    if cfg.reference not in models:
        raise ConfigError(f"reference '{cfg.reference}' is not one of models ({', '.join(models)})")
    check_settings("evaluate", OmegaConf.create({"trigger": cfg.trigger}), prefix="evaluate-mitigation")
    return models


def pareto(cfg: DictConfig, run_dir: Path) -> dict:
    """``pareto.parquet`` (trials + runs) and ``pareto.png`` from the study and the runs' objectives."""
    runs_cfg = cast("dict[str, Any]", OmegaConf.to_container(cfg.pareto_runs, resolve=True) or {})
    trials, runs = pareto_points(cfg.study, runs_cfg)
    write_parquet(run_dir / "pareto.parquet", pd.concat([trials.assign(run="memcontrol"), runs], ignore_index=True))
    pareto_figure(trials, runs, run_dir / "pareto.png")
    front = trials[trials["pareto"]]
    return {
        "n_trials": len(trials),
        "front": front.drop(columns="pareto").to_dict("records"),
        "runs": runs.to_dict("records"),
    }


def prepare(
    cfg: DictConfig,
) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame, torch.Tensor, pd.DataFrame, torch.Tensor]:
    """The models, prompts, target and utility images, checked before anything is written."""
    from diffmem.data.selection import load_targets, select_prompts
    from diffmem.mitigations.objectives import real_rows

    models = check_config(cfg)
    root, manifest = load_dataset(cfg.data)
    prompts = stage_prompts(cfg, manifest)
    positives = cast(
        "dict[str, Any] | None", OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None
    )
    targets, negatives, _ = select_prompts(prompts, positives, cfg.get("max_targets"), 0, stage="evaluate-mitigation")
    target_images = load_targets(root, targets, int(cfg.resolution), False)
    u = cfg.utility
    urows = real_rows(manifest, u.split, int(u.n_prompts), int(cfg.seed), u.get("kinds"))
    real = load_unit_images(root, urows["file"], int(cfg.resolution))
    return models, prompts, targets, negatives, target_images, urows, real


def body(job: Job) -> Outcome:
    """Every model on the three axes (its parts cached per model and settings), then the table."""
    from diffmem.features import build_extractor
    from diffmem.loading import load_model
    from diffmem.probes.context import ProbeContext, trigger_settings
    from diffmem.sampling import get_hooks

    cfg, run_dir, u = job.cfg, job.dir, job.cfg.utility
    models, _, targets, negatives, target_images, urows, real = job.ctx
    device = configure_torch(cfg)
    extractor = build_extractor(cfg.features.extractor, device=str(device))
    util_extractor = build_extractor(u.features, device=str(device))
    clip = cast("ClipExtractor", build_extractor(u.clip, device=str(device))) if u.get("clip") else None
    ts = trigger_settings(cfg.trigger)
    # a model's parts depend only on it and these settings: tables with other models share them
    settings = SPEC.fingerprint(cfg)
    for key in ("models", "reference", "study", "pareto_runs"):
        settings.pop(key, None)
    parts = Path(cfg.parts_dir) if cfg.get("parts_dir") else run_dir / "models"
    rows, start = [], time.perf_counter()
    with distributed.split():  # each rank takes a share of every model's generations and trigger restarts
        for name, path in models.items():
            log.info("evaluate-mitigation: %s (%s)", name, path)
            pipe = load_model(
                {"path": path, "precision": cfg.precision, "vae_slicing": cfg.vae_slicing},
                device,
                scheduler=cfg.scheduler,
            )

            ctx = ProbeContext.build(
                pipe,
                extractor,
                (targets, target_images, negatives, targets.iloc[:0], target_images[:0]),  # no controls
                parts / f"{name}-{digest([str(Path(path).resolve()), settings])}",
                cfg,
            )
            defence = get_hooks(pipe)
            rows.append(
                {
                    "model": name,
                    "path": str(path),
                    "defence": defence.name if defence else None,
                    **evaluate_model(ctx, ts, urows, real, u, util_extractor, clip),
                }
            )
        data_parallel = distributed.dealt_summary()
    if not distributed.is_main():  # rank 0 publishes
        return Outcome(complete=False)
    table = pd.DataFrame(rows)
    ref = float(table.loc[table["model"] == cfg.reference, "fd"].iloc[0])
    table["fd_ratio"] = table["fd"] / ref
    table["utility_within_10pct"] = table["fd_ratio"] <= 1.1
    write_parquet(run_dir / "mitigations.parquet", table)
    mitigation_figure(table, run_dir / "mitigations.png", str(cfg.reference))
    extra = {"pareto": pareto(cfg, run_dir)} if cfg.get("study") else {}
    seconds = time.perf_counter() - start
    log.info("evaluate-mitigation: %d models in %.0f s", len(table), seconds)
    return Outcome(
        {"models": list(models), "reference": cfg.reference},
        {"data_parallel": data_parallel},
        {
            "reference": cfg.reference,
            "n_targets": len(targets),
            "threshold": float(cfg.threshold),
            "trigger_budget": ts,
            "utility": {"split": str(u.split), "n_prompts": len(urows), "features": util_extractor.info()},
            "features": extractor.info(),
            "seconds": seconds,
            "table": table.drop(columns=["path"]).to_dict("records"),
            **extra,
        },
    )


#: ``parts_dir`` is where parts are cached, shared between tables; batch sizes and VAE slicing
#: do not change results
SPEC = StageSpec(
    "evaluate-mitigation",
    body,
    prepare,
    volatile=("batch_size", "vae_slicing", "parts_dir"),
    inputs=lambda cfg, ctx: {"prompt list": ctx[1]},
    data_parallel=True,
)
run = SPEC.run
main = hydra_app("evaluate-mitigation", run)

if __name__ == "__main__":
    main()
