"""``diffmem mitigate``: build a mitigated model (``mitigation=``, docs/methods.md section 5).

``mitigation=adversarial_ft`` (Finding Dori), ``memcontrol`` (one MemControl trial: masked
LoRA with a searched learning rate; ``experiment=memcontrol`` runs the Optuna NSGA-II study),
``full_ft`` and ``lora`` (its baselines), ``train_mc|train_rc|train_rt|train_cwr|train_gni``
(Somepalli et al.'s caption mitigations while fine-tuning), ``train_noise_filter`` (Wen et al.'s
training-time mitigation), and the inference-time ``wen``, ``gni``, ``random_tokens``.

Writes ``model/`` (a diffusers folder; for LoRA kinds an adapter folder over the base model,
:mod:`diffmem.models.adapters`; for inference-time mitigations a defence wrapper; any stage
loads each as ``model=local model.path=<run dir>/model``), ``objectives.json`` (MemControl's
two objectives, measured on the published model), ``metrics.json`` with provenance,
``train_log.parquet`` for fine-tuning kinds, and ``info.json`` + ``_SUCCESS`` last. A killed
run re-run with the same config resumes from its checkpoints (removed once ``_SUCCESS`` is
written, unless ``keep_checkpoints=true``). Under the Optuna sweeper the task returns
``[memorisation, fd]``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from diffmem import distributed
from diffmem.config import hydra_app
from diffmem.device import configure_torch
from diffmem.data import load_dataset, load_unit_images
from diffmem.data.prompts import stage_prompts
from diffmem.data.selection import check_targets, split_prompts
from diffmem.errors import ConfigError
from diffmem.mitigations import MITIGATIONS
from diffmem.mitigations.builders import MitigationTask, sampler_settings
from diffmem.runs import (check_claim, claim, config_subset, finish, is_done, provenance, read_json,
                          write_json)
from diffmem.loading import load_model
from diffmem.sampling import encode_prompts, get_hooks
from diffmem.training import drop_checkpoints

log = logging.getLogger(__name__)


def objectives(cfg: DictConfig, model_dir: Path, root: Path, manifest: pd.DataFrame,
               memorised: pd.DataFrame) -> dict:
    """MemControl's objectives on the published model: memorisation (mean first-step noise norm
    on the memorised prompts) and quality (Fréchet distance of generations for held-out captions
    to those held-out images, in the ``features`` space)."""
    from diffmem.features import build_extractor
    from diffmem.mitigations.objectives import memorisation, real_rows, utility
    from diffmem.models import resolve_device

    o = cfg.objectives
    pipe = load_model({**OmegaConf.to_container(cfg.model, resolve=True), "path": str(model_dir)},
                      resolve_device(cfg.device), scheduler=cfg.scheduler)
    sampling = sampler_settings(cfg)
    mem_cond = encode_prompts(pipe, memorised["caption"].tolist())
    score = memorisation(pipe, mem_cond, memorised["prompt_id"], seed=int(cfg.seed), **sampling)
    rows = real_rows(manifest, o.split, int(o.n_prompts), int(cfg.seed), o.get("kinds"))
    extractor = build_extractor(o.features, device=str(pipe.unet.device))
    real = load_unit_images(root, rows["file"], int(cfg.resolution))
    util = utility(pipe, extractor, encode_prompts(pipe, rows["caption"].tolist()), np.arange(len(rows)), real,
                   n_per_prompt=int(o.n_per_prompt), seed=int(cfg.seed), batch_size=int(cfg.batch_size), **sampling)
    return {"memorisation": score, "fd": util["fd"], "n_memorised": len(memorised), "n_utility_prompts": len(rows),
            "utility_split": str(o.split), "features": extractor.info()}


def check_config(cfg: DictConfig):
    """The kind's builder, after checking the settings (nothing is written before this)."""
    s = cfg.mitigation
    fn = MITIGATIONS.get(s.kind)
    if s.kind == "adversarial_ft":
        from diffmem.probes.context import check_settings

        check_settings("adversarial_ft", s, prefix="mitigation")
    return fn


def fingerprint(cfg: DictConfig) -> dict:
    return config_subset(cfg, ["model", "data", "prompts", "features", "mitigation", "objectives", "seed",
                               "resolution", "scheduler", "steps", "guidance_scale", "positives"])


def run(cfg: DictConfig) -> Path:
    """Build the mitigation per ``cfg``; returns the run dir."""
    fn = check_config(cfg)
    root, manifest = load_dataset(cfg.data)
    prompts = stage_prompts(cfg, manifest)
    positives = OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None
    memorised, negatives = (t.reset_index(drop=True) for t in split_prompts(prompts, positives, "mitigate"))
    if cfg.mitigation.kind == "adversarial_ft":  # fine-tunes against the memorised training images
        check_targets(memorised, "mitigate mitigation=adversarial_ft")
    if check_claim(cfg.run_dir, fingerprint(cfg)) and is_done(cfg.run_dir):
        log.info("mitigate: %s is complete", cfg.run_dir)
        return Path(cfg.run_dir)
    pipe = load_model(cfg.model, configure_torch(cfg), scheduler=cfg.scheduler)
    if get_hooks(pipe) is not None:
        raise ConfigError(f"model.path {cfg.model.path} is an inference-time defence; mitigate a plain model")
    run_dir = claim(cfg.run_dir, fingerprint(cfg)) if distributed.is_main() else Path(cfg.run_dir)
    distributed.barrier("mitigate: run dir claimed")
    if not (distributed.is_main() or cfg.mitigation.kind in ("finetune", "adversarial_ft")):
        return run_dir  # rank 0 builds a defence alone; the other ranks share fine-tunes only
    torch.manual_seed(int(cfg.seed))
    start = time.perf_counter()
    summary = fn(MitigationTask(cfg=cfg, pipe=pipe, root=root, manifest=manifest, memorised=memorised,
                                negatives=negatives, run_dir=run_dir))
    if not distributed.is_main():  # rank 0 publishes
        return run_dir
    seconds = time.perf_counter() - start
    if cfg.objectives.enabled:
        obj_file = run_dir / "objectives.json"
        if not obj_file.exists():
            write_json(obj_file, objectives(cfg, run_dir / "model", root, manifest, memorised))
        summary["objectives"] = read_json(obj_file)
    write_json(run_dir / "metrics.json", {"mitigation": cfg.mitigation.name, "kind": cfg.mitigation.kind,
                                          "model": cfg.model.name, "seconds": seconds, **summary,
                                          "provenance": provenance(cfg)})
    log.info("mitigate: %s in %.0f s -> %s", cfg.mitigation.name, seconds, run_dir / "model")
    finish(run_dir, cfg, {"mitigation": cfg.mitigation.name, "model": str(run_dir / "model")},
           data_parallel=summary.pop("data_parallel", distributed.summary(lambda r, w: 0)))
    drop_checkpoints(run_dir, bool(cfg.get("keep_checkpoints", False)))
    return run_dir


def task(cfg: DictConfig):
    """The Hydra task: runs :func:`run`; returns ``[memorisation, fd]`` (the Optuna objectives)
    when ``objectives.enabled``."""
    run_dir = run(cfg)
    if cfg.objectives.enabled and distributed.is_main():
        o = read_json(Path(run_dir) / "objectives.json")
        return [o["memorisation"], o["fd"]]
    return None


main = hydra_app("mitigate", task)

if __name__ == "__main__":
    main()
