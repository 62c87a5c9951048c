"""``diffmem mitigate``: build a mitigated model (``mitigation=``, docs/methods.md section 5).

``mitigation=adversarial_ft`` (Finding Dori), ``memcontrol`` (one MemControl trial: masked
LoRA with a searched learning rate; ``experiment=memcontrol`` runs the Optuna NSGA-II study),
``full_ft`` and ``lora`` (its baselines), ``train_mc|train_rc|train_rt|train_cwr|train_gni``
(Somepalli et al.'s caption mitigations while fine-tuning), ``train_noise_filter`` (Wen et al.'s
training-time mitigation), and the inference-time ``wen``, ``gni``, ``random_tokens``.

Writes ``model/`` (a diffusers folder, or a defence wrapper for inference-time mitigations;
any stage loads it as ``model=local model.path=<run dir>/model``), ``objectives.json``
(MemControl's two objectives, measured on the published model), ``metrics.json`` with
provenance, ``train_log.parquet`` for fine-tuning kinds, and ``info.json`` + ``_SUCCESS``
last. A killed run re-run with the same config resumes from its checkpoints. Under the
Optuna sweeper the task returns ``[memorisation, fd]``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from diffmem.checks import check_positive
from diffmem.config import hydra_app
from diffmem.device import configure_torch
from diffmem.data import load_dataset, load_prompts, load_unit_images
from diffmem.errors import ConfigError, DataError
from diffmem.probe import split_prompts
from diffmem.mitigations import MITIGATIONS
from diffmem.runs import (check_claim, claim, config_subset, finish, is_done, provenance, read_json,
                          write_json, write_parquet)
from diffmem.sampling import encode_prompts

log = logging.getLogger(__name__)


def _sampling(cfg: DictConfig) -> dict:
    """The sampler settings every generation of the stage uses."""
    return dict(resolution=int(cfg.resolution), steps=int(cfg.steps), guidance=float(cfg.guidance_scale))


def _positions(values, keys) -> torch.Tensor:
    """The position of each of ``values`` in ``keys`` (every value is one of them)."""
    return torch.as_tensor(pd.Index(keys).get_indexer(values), dtype=torch.long)


@dataclass
class Job:
    """What a mitigation kind builds from: the model, the data, the memorised prompts."""

    cfg: DictConfig
    pipe: object
    root: Path
    manifest: pd.DataFrame
    memorised: pd.DataFrame     # memorised prompts (prompt_id, caption, target_file, ...)
    negatives: pd.DataFrame     # non-memorised prompts
    run_dir: Path

    @property
    def settings(self):
        return self.cfg.mitigation

    def train_rows(self) -> pd.DataFrame:
        m = self.manifest
        rows = m[m["split"] == "train"] if "split" in m else m
        if rows.empty:
            raise DataError(f"{self.root}: the dataset has no training rows to fine-tune on")
        return rows.reset_index(drop=True)

    def images(self, files) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] (the descriptors' and trigger search's range)."""
        return load_unit_images(self.root, list(files), int(self.cfg.resolution))

    def latents(self, rows: pd.DataFrame) -> torch.Tensor:
        """Scaled VAE latents of ``rows``' images (each file encoded once)."""
        from diffmem.train import encode_latents

        files = rows["file"].unique()
        z = encode_latents(self.pipe.vae, self.images(files) * 2 - 1)
        return z[_positions(rows["file"], files)]

    def cond(self, captions) -> torch.Tensor:
        return encode_prompts(self.pipe, list(captions)).float().cpu()

    def sampling(self) -> dict:
        return _sampling(self.cfg)


def build_defence(job: Job) -> dict:
    """An inference-time wrapper over the model; Wen's ``target`` defaults to the mean noise
    norm of the non-memorised prompts on this model."""
    from diffmem.mitigations.defences import build_defence as make, save_defence
    from diffmem.mitigations.objectives import memorisation

    s = OmegaConf.to_container(job.settings, resolve=True)
    name = s.pop("defence")
    settings = {k: v for k, v in s.items() if k not in ("name", "kind", "objectives")}
    if name == "wen" and settings.get("target") is None:
        if job.negatives.empty:
            raise DataError("mitigation wen: target null needs non-memorised prompts to calibrate on")
        settings["target"] = memorisation(job.pipe, job.cond(job.negatives["caption"]), job.negatives["prompt_id"],
                                          seed=int(job.cfg.seed), **job.sampling())
    defence = make(name, {**settings, "seed": int(settings.get("seed", job.cfg.seed))})
    save_defence(job.run_dir / "model", defence, job.cfg.model.path)
    return {"defence": name, "settings": defence.settings()}


def build_finetune(job: Job) -> dict:
    """MemControl's inner loop and every other fine-tuning mitigation (masked full/LoRA)."""
    from diffmem.mitigations.finetune import calibrate_tau, finetune, merge, prepare, selected_blocks
    from diffmem.models import save_pipeline

    s, unet = job.settings, job.pipe.unet
    rows = job.train_rows()
    latents = job.latents(rows)
    captions = rows["caption"].astype(str).tolist()
    tau = None
    if s.get("noise_filter"):
        f = s.noise_filter
        tau = f.get("tau")
        if tau is None:
            tau_file = job.run_dir / "tau.json"
            if not tau_file.exists():
                write_json(tau_file, {"tau": calibrate_tau(job.pipe, latents, captions, float(f.quantile),
                                                           int(f.n_calibration), int(job.cfg.seed))})
            tau = read_json(tau_file)["tau"]
    total = sum(p.numel() for p in unet.parameters())
    blocks = selected_blocks(unet, s.get("mask"))
    trainable = prepare(unet, s.method, blocks, int(s.get("rank", 4)))
    if trainable:
        losses = finetune(job.pipe, latents, captions, s, seed=int(job.cfg.seed),
                          ckpt_dir=job.run_dir / "checkpoints", tau=tau)
    else:
        log.warning("mitigation.mask selects no transformer block: the model is published unchanged")
        losses = []
    merge(unet, s.method)
    write_parquet(job.run_dir / "train_log.parquet", pd.DataFrame(losses))
    save_pipeline(job.pipe, job.run_dir / "model")
    return {"method": s.method, "blocks": blocks, "trainable_params": int(trainable),
            "trainable_share": trainable / total, "tau": tau, "final_loss": losses[-1]["loss"] if losses else None}


def build_adversarial_ft(job: Job) -> dict:
    """Finding Dori's adversarial fine-tuning of the whole UNet."""
    from safetensors.torch import load_file, save_file

    from diffmem.features import build_extractor
    from diffmem.mitigations.adversarial import adversarial_finetune, surrogates
    from diffmem.models import save_pipeline
    from diffmem.runs import atomic_path

    s, cfg = job.settings, job.cfg
    mem = job.memorised
    if job.negatives.empty:
        raise DataError("adversarial_ft: needs non-memorised prompts (the 'other' trigger inits)")
    target_images = job.images(mem["target_file"])
    target_cond = job.cond(mem["caption"])
    sur_file = job.run_dir / "surrogates.safetensors"
    if not sur_file.exists():
        extractor = build_extractor(cfg.features.extractor, device=str(job.pipe.unet.device))
        images, table = surrogates(job.pipe, extractor, target_cond, target_images, mem["prompt_id"], s.surrogate,
                                   seed=int(cfg.seed), threshold=float(cfg.features.replication_threshold),
                                   **job.sampling())
        write_parquet(job.run_dir / "surrogates.parquet", table.assign(caption=mem["caption"].to_numpy()))
        with atomic_path(sur_file) as tmp:
            save_file({"images": images.contiguous()}, str(tmp))
    sur = load_file(str(sur_file))["images"]
    rows = job.train_rows()
    rows = rows[~rows["caption"].isin(set(mem["caption"]))]
    if "kind" in rows:
        rows = rows[rows["kind"] == "ordinary"]
    rows = rows.reset_index(drop=True)
    unique = sorted(set(rows["caption"]))
    util_cond = job.cond(unique)[_positions(rows["caption"], unique)]
    losses = adversarial_finetune(job.pipe, job.latents(rows), util_cond, target_images, target_cond, sur,
                                  job.cond(job.negatives["caption"]), s, seed=int(cfg.seed),
                                  ckpt_dir=job.run_dir / "checkpoints", trigger_dir=job.run_dir / "triggers")
    write_parquet(job.run_dir / "train_log.parquet", pd.DataFrame(losses))
    save_pipeline(job.pipe, job.run_dir / "model")
    n_refresh = len(list((job.run_dir / "triggers").glob("refresh-*.safetensors")))
    return {"n_targets": len(mem), "n_utility_rows": len(rows), "trigger_refreshes": n_refresh,
            "surrogates_replicating": int(pd.read_parquet(job.run_dir / "surrogates.parquet")["replicates"].sum()),
            "final_loss": losses[-1]["loss"] if losses else None}


def objectives(cfg: DictConfig, model_dir: Path, root: Path, manifest: pd.DataFrame,
               memorised: pd.DataFrame) -> dict:
    """MemControl's objectives on the published model: memorisation (mean first-step noise norm
    on the memorised prompts) and quality (Fréchet distance of generations for held-out captions
    to those held-out images, in the ``features`` space)."""
    from diffmem.features import build_extractor
    from diffmem.mitigations.objectives import memorisation, real_rows, utility
    from diffmem.models import load_pipeline, resolve_device

    o = cfg.objectives
    pipe = load_pipeline(model_dir, device=resolve_device(cfg.device), dtype=cfg.model.dtype,
                         local_files_only=True, scheduler=cfg.scheduler)
    sampling = _sampling(cfg)
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
    for field in ("steps", "batch_size", "ckpt_every", "refresh_every"):
        if field in s:
            check_positive(s[field], f"mitigation.{field}")
    if "lr" in s and not float(s.lr) > 0:
        raise ConfigError(f"mitigation.lr must be > 0 (got {s.lr})")
    for field in ("steps", "batch_size"):
        check_positive(cfg[field], field)
    if s.kind == "adversarial_ft":
        from diffmem.probes.runners import check_settings

        check_settings("adversarial_ft", s, prefix="mitigation")
    return fn


def fingerprint(cfg: DictConfig) -> dict:
    return config_subset(cfg, ["model", "data", "prompts", "features", "mitigation", "objectives", "seed",
                               "resolution", "scheduler", "steps", "guidance_scale", "positives"])


def run(cfg: DictConfig) -> Path:
    """Build the mitigation per ``cfg``; returns the run dir."""
    from diffmem.models import load_pipeline

    fn = check_config(cfg)
    root, manifest = load_dataset(cfg.data)
    prompts = load_prompts(cfg.prompts, manifest if cfg.prompts.kind == "testbed" else None)
    positives = OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None
    memorised, negatives = (t.reset_index(drop=True) for t in split_prompts(prompts, positives, "mitigate"))
    if check_claim(cfg.run_dir, fingerprint(cfg)) and is_done(cfg.run_dir):
        log.info("mitigate: %s is complete", cfg.run_dir)
        return Path(cfg.run_dir)
    pipe = load_pipeline(cfg.model.path, device=configure_torch(cfg), dtype=cfg.model.dtype,
                         local_files_only=cfg.model.local_files_only, scheduler=cfg.scheduler)
    if getattr(pipe, "diffmem_defence", None) is not None:
        raise ConfigError(f"model.path {cfg.model.path} is an inference-time defence; mitigate a plain model")
    run_dir = claim(cfg.run_dir, fingerprint(cfg))
    torch.manual_seed(int(cfg.seed))
    start = time.perf_counter()
    job = Job(cfg=cfg, pipe=pipe, root=root, manifest=manifest, memorised=memorised, negatives=negatives,
              run_dir=run_dir)
    summary = fn(job)
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
    return finish(run_dir, cfg, {"mitigation": cfg.mitigation.name, "model": str(run_dir / "model")})


def task(cfg: DictConfig):
    """The Hydra task: runs :func:`run`; returns ``[memorisation, fd]`` (the Optuna objectives)
    when ``objectives.enabled``."""
    run_dir = run(cfg)
    if cfg.objectives.enabled:
        o = read_json(Path(run_dir) / "objectives.json")
        return [o["memorisation"], o["fd"]]
    return None


main = hydra_app("mitigate", task)

if __name__ == "__main__":
    main()
