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

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from diffmem.config import hydra_app
from diffmem.device import configure_torch
from diffmem.data import load_dataset, load_unit_images
from diffmem.data.prompts import stage_prompts
from diffmem.errors import ConfigError, DataError
from diffmem.report.figures import save_figure
from diffmem.runs import (check_claim, claim, config_subset, digest, finish, is_done, provenance, read_json,
                          write_json, write_parquet)

log = logging.getLogger(__name__)


def fingerprint(cfg: DictConfig) -> dict:
    return config_subset(cfg, ["models", "reference", "data", "prompts", "features", "trigger", "utility", "seed",
                               "precision", "resolution", "scheduler", "steps", "guidance_scale", "n_per_prompt", "threshold",
                               "mr_reduction", "positives", "max_targets", "study", "pareto_runs"])


def check_config(cfg: DictConfig) -> dict:
    """``{name: model path}`` after checking the settings (nothing is written before this)."""
    from diffmem.probes.context import check_settings

    models = OmegaConf.to_container(cfg.models, resolve=True) or {}
    if not models:
        raise ConfigError("models: name at least one model folder (name: path)")
    for name, path in models.items():
        if not Path(str(path)).expanduser().exists():
            raise DataError(f"models.{name}: {path} does not exist")
    if cfg.reference not in models:
        raise ConfigError(f"reference '{cfg.reference}' is not one of models ({', '.join(models)})")
    check_settings("evaluate", OmegaConf.create({"trigger": cfg.trigger}), prefix="evaluate-mitigation")
    return models


def evaluate_model(ctx, ts: dict, utility_rows: pd.DataFrame, real: torch.Tensor, u, util_extractor,
                   clip=None) -> dict:
    """The three axes for the model in ``ctx`` (parts cached under ``ctx.run_dir``)."""
    from diffmem.mitigations.objectives import utility
    from diffmem.probes.context import attack, attack_summary, baseline_summary
    from diffmem.sampling import encode_prompts

    base = ctx.baseline("model")
    attacked = pd.concat([attack(ctx, "target", i, ts, f"attack-target-{i}") for i in range(len(ctx.targets))],
                         ignore_index=True)
    util = ctx.json_part("utility", lambda: utility(
        ctx.pipe, util_extractor, encode_prompts(ctx.pipe, utility_rows["caption"].tolist()),
        np.arange(len(utility_rows)), real, n_per_prompt=int(u.n_per_prompt), seed=ctx.seed,
        resolution=ctx.resolution, steps=ctx.steps, guidance=ctx.guidance, batch_size=ctx.batch_size,
        clip=clip, captions=utility_rows["caption"].tolist()))
    b, a = baseline_summary(ctx, base), attack_summary(ctx, attacked)
    return {"mr": b["mr"], "similarity": b["similarity"], "mr_attacked": a["mr"], "similarity_attacked": a["similarity"],
            "fd": util["fd"], "diversity": util.get("diversity", float("nan")),
            **({"clip_score": util["clip_score"]} if "clip_score" in util else {})}


def figure(table: pd.DataFrame, path: Path, reference: str) -> Path:
    """Three panels per model: MR as prompted, MR under trigger search, FD relative to the reference."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(table) + 2), 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    x = np.arange(len(table))
    for ax, col, title, color in ((axes[0], "mr", "MR (original prompts)", "#c44e52"),
                                  (axes[1], "mr_attacked", "MR under trigger search", "#8c2d04"),
                                  (axes[2], "fd_ratio", f"FD / FD of {reference}", "#4c72b0")):
        ax.bar(x, table[col].to_numpy(), color=color)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(table["model"], rotation=60, ha="right", fontsize=7)
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylim(0, 1.05)
    axes[2].axhline(1.1, color="k", linestyle="--", linewidth=1, label="+10 %")
    axes[2].legend(frameon=False, fontsize=7)
    return save_figure(fig, path)


def pareto_figure(trials: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path:
    """MemControl's trials (front joined), and the other fine-tuning runs as labelled points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.scatter(trials["memorisation"], trials["fd"], s=18, color="#bbbbbb", label="MemControl trials")
    front = trials[trials["pareto"]].sort_values("memorisation")
    ax.plot(front["memorisation"], front["fd"], "o-", color="#c44e52", label="MemControl Pareto front")
    for _, r in runs.iterrows():
        ax.scatter([r["memorisation"]], [r["fd"]], marker="s", s=36, zorder=3)
        ax.annotate(r["run"], (r["memorisation"], r["fd"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set(xlabel="memorisation: noise norm on memorised prompts (lower = less)",
           ylabel="FD on held-out captions (lower = better)")
    ax.legend(frameon=False, fontsize=7)
    return save_figure(fig, path)


def pareto(cfg: DictConfig, run_dir: Path) -> dict:
    """``pareto.parquet`` (trials + runs) and ``pareto.png`` from the study and the runs' objectives."""
    from diffmem.mitigations.memcontrol import study_table, storage_url

    trials = study_table(storage_url(cfg.study.path), str(cfg.study.name))
    runs = []
    for name, path in (OmegaConf.to_container(cfg.pareto_runs, resolve=True) or {}).items():
        f = Path(str(path)) / "objectives.json"
        if not f.exists():
            raise DataError(f"pareto_runs.{name}: {f} does not exist (a mitigate run with objectives)")
        o = read_json(f)
        runs.append({"run": name, "memorisation": o["memorisation"], "fd": o["fd"]})
    runs = pd.DataFrame(runs, columns=["run", "memorisation", "fd"])
    write_parquet(run_dir / "pareto.parquet", pd.concat([trials.assign(run="memcontrol"), runs], ignore_index=True))
    pareto_figure(trials, runs, run_dir / "pareto.png")
    front = trials[trials["pareto"]]
    return {"n_trials": len(trials), "front": front.drop(columns="pareto").to_dict("records"),
            "runs": runs.to_dict("records")}


def run(cfg: DictConfig) -> Path:
    """Evaluate every model per ``cfg``; returns the run dir."""
    from diffmem.features import build_extractor
    from diffmem.mitigations.objectives import real_rows
    from diffmem.data.selection import load_targets, select_prompts
    from diffmem.loading import load_model
    from diffmem.probes.context import ProbeContext, rows_conditioning, trigger_settings
    from diffmem.sampling import get_hooks
    from diffmem.distributed import single_process

    single_process("evaluate-mitigation")  # its sampling is not split across ranks yet

    models = check_config(cfg)
    root, manifest = load_dataset(cfg.data)
    prompts = stage_prompts(cfg, manifest)
    positives = OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None
    targets, negatives, _ = select_prompts(prompts, positives, cfg.get("max_targets"), 0, stage="evaluate-mitigation")
    target_images = load_targets(root, targets, int(cfg.resolution), False)
    u = cfg.utility
    urows = real_rows(manifest, u.split, int(u.n_prompts), int(cfg.seed), u.get("kinds"))
    real = load_unit_images(root, urows["file"], int(cfg.resolution))
    if check_claim(cfg.run_dir, fingerprint(cfg)) and is_done(cfg.run_dir):
        log.info("evaluate-mitigation: %s is complete", cfg.run_dir)
        return Path(cfg.run_dir)
    device = configure_torch(cfg)
    extractor = build_extractor(cfg.features.extractor, device=str(device))
    util_extractor = build_extractor(u.features, device=str(device))
    clip = build_extractor(u.clip, device=str(device)) if u.get("clip") else None
    run_dir = claim(cfg.run_dir, fingerprint(cfg))
    ts = trigger_settings(cfg.trigger)
    # a model's parts depend only on it and these settings: tables with other models share them
    settings = {k: v for k, v in fingerprint(cfg).items() if k not in ("models", "reference", "study", "pareto_runs")}
    parts = Path(cfg.parts_dir) if cfg.get("parts_dir") else run_dir / "models"
    rows, start = [], time.perf_counter()
    for name, path in models.items():
        log.info("evaluate-mitigation: %s (%s)", name, path)
        pipe = load_model({"path": path, "precision": cfg.precision, "vae_slicing": cfg.vae_slicing}, device,
                          scheduler=cfg.scheduler)

        ctx = ProbeContext(pipe=pipe, extractor=extractor, targets=targets, target_images=target_images,
                           target_cond=rows_conditioning(pipe, targets), negatives=negatives,
                           negative_cond=rows_conditioning(pipe, negatives),
                           controls=targets.iloc[:0], control_images=target_images[:0], control_cond=torch.zeros(0),
                           run_dir=parts / f"{name}-{digest([str(Path(path).resolve()), settings])}",
                           seed=int(cfg.seed), resolution=int(cfg.resolution),
                           steps=int(cfg.steps), guidance=float(cfg.guidance_scale),
                           n_per_prompt=int(cfg.n_per_prompt), threshold=float(cfg.threshold),
                           mr_reduction=str(cfg.mr_reduction), batch_size=int(cfg.batch_size))
        defence = get_hooks(pipe)
        rows.append({"model": name, "path": str(path), "defence": defence.name if defence else None,
                     **evaluate_model(ctx, ts, urows, real, u, util_extractor, clip)})
    table = pd.DataFrame(rows)
    ref = float(table.loc[table["model"] == cfg.reference, "fd"].iloc[0])
    table["fd_ratio"] = table["fd"] / ref
    table["utility_within_10pct"] = table["fd_ratio"] <= 1.1
    write_parquet(run_dir / "mitigations.parquet", table)
    figure(table, run_dir / "mitigations.png", str(cfg.reference))
    extra = {"pareto": pareto(cfg, run_dir)} if cfg.get("study") else {}
    seconds = time.perf_counter() - start
    write_json(run_dir / "metrics.json", {
        "reference": cfg.reference, "n_targets": len(targets), "threshold": float(cfg.threshold),
        "trigger_budget": ts, "utility": {"split": str(u.split), "n_prompts": len(urows), "features": util_extractor.info()},
        "features": extractor.info(), "seconds": seconds,
        "table": table.drop(columns=["path"]).to_dict("records"), **extra, "provenance": provenance(cfg)})
    log.info("evaluate-mitigation: %d models in %.0f s", len(table), seconds)
    return finish(run_dir, cfg, {"models": list(models), "reference": cfg.reference})


main = hydra_app("evaluate-mitigation", run)

if __name__ == "__main__":
    main()
