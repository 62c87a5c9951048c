"""The builders of the mitigation kinds ``diffmem mitigate`` runs (:data:`diffmem.mitigations.MITIGATIONS`).

Each builder takes a :class:`MitigationTask` and writes the mitigated model to
``<run dir>/model`` (a diffusers folder, or a defence wrapper), plus its own resumable
pieces (checkpoints, triggers, surrogates); it returns a summary for ``metrics.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from diffmem import distributed
from diffmem.data import load_unit_images
from diffmem.errors import DataError
from diffmem.runs import atomic_path, read_json, resumed, write_json, write_parquet
from diffmem.sampling import encode_prompts
from diffmem.training import CHECKPOINTS, TRAIN_LOG, encode_files, fit_items

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

log = logging.getLogger(__name__)


def sampler_settings(cfg: DictConfig) -> dict:
    """The sampler settings every generation of the stage uses."""
    return dict(resolution=int(cfg.resolution), steps=int(cfg.steps), guidance=float(cfg.guidance_scale))


def _positions(values: Iterable[str], keys: Iterable[str]) -> torch.Tensor:
    """The position of each of ``values`` in ``keys`` (every value is one of them)."""
    return torch.as_tensor(pd.Index(keys).get_indexer(values), dtype=torch.long)


@dataclass
class MitigationTask:
    """What a mitigation kind builds from: the stage's config, the model, the data, the
    memorised and non-memorised prompts, and the run dir it writes into."""

    cfg: DictConfig
    pipe: StableDiffusionPipeline
    root: Path
    manifest: pd.DataFrame
    memorised: pd.DataFrame  # memorised prompts (prompt_id, caption, target_file, ...)
    negatives: pd.DataFrame  # non-memorised prompts
    run_dir: Path

    @property
    def settings(self) -> DictConfig:
        return self.cfg.mitigation

    def train_rows(self) -> pd.DataFrame:
        m = self.manifest
        rows = m[m["split"] == "train"] if "split" in m else m
        if rows.empty:
            raise DataError(f"{self.root}: the dataset has no training rows to fine-tune on")
        return rows.reset_index(drop=True)

    def images(self, files: Iterable[str]) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] (the descriptors' and trigger search's range)."""
        return load_unit_images(self.root, list(files), int(self.cfg.resolution))

    def latents(self, rows: pd.DataFrame) -> torch.Tensor:
        """Scaled VAE latents of ``rows``' images (each file encoded once; the images are read
        ``batch_size`` at a time, never all in memory)."""
        files = rows["file"].unique()
        z = encode_files(self.pipe.vae, self.root, list(files), int(self.cfg.resolution), int(self.cfg.batch_size))
        return z[_positions(rows["file"], files)]

    def cond(self, captions: Iterable[str]) -> torch.Tensor:
        return encode_prompts(self.pipe, list(captions)).float().cpu()

    def sampling(self) -> dict:
        return sampler_settings(self.cfg)


def build_defence(task: MitigationTask) -> dict:
    """An inference-time wrapper over the model; Wen's ``target`` defaults to the mean noise
    norm of the non-memorised prompts on this model."""
    from diffmem.mitigations.defences import build_defence as make
    from diffmem.mitigations.defences import save_defence
    from diffmem.mitigations.objectives import memorisation

    s = cast("dict[str, Any]", OmegaConf.to_container(task.settings, resolve=True))
    name = s.pop("defence")
    settings = {k: v for k, v in s.items() if k not in ("name", "kind", "objectives")}
    if name == "wen" and settings.get("target") is None:
        if task.negatives.empty:
            raise DataError("mitigation wen: target null needs non-memorised prompts to calibrate on")
        settings["target"] = memorisation(
            task.pipe,
            task.cond(task.negatives["caption"]),
            task.negatives["prompt_id"],
            seed=int(task.cfg.seed),
            **task.sampling(),
        )
    defence = make(name, {**settings, "seed": int(settings.get("seed", task.cfg.seed))})
    save_defence(task.run_dir / "model", defence, task.cfg.model.path)
    return {"defence": name, "settings": defence.settings()}


def build_finetune(task: MitigationTask) -> dict:
    """MemControl's inner loop and every other fine-tuning mitigation (masked full/LoRA)."""
    from diffmem.mitigations.finetune import calibrate_tau, finetune, merge, prepare, selected_blocks
    from diffmem.models import save_pipeline
    from diffmem.models.adapters import save_adapter

    s, unet = task.settings, task.pipe.unet
    rows = task.train_rows()
    latents = task.latents(rows)
    captions = rows["caption"].astype(str).tolist()
    tau = None
    if s.get("noise_filter"):
        f = s.noise_filter
        tau = f.get("tau")
        if tau is None:
            tau_file = task.run_dir / "tau.json"
            tau = resumed(
                tau_file,
                lambda p: float(read_json(p)["tau"]),
                lambda: write_json(
                    tau_file,
                    {
                        "tau": calibrate_tau(
                            task.pipe, latents, captions, float(f.quantile), int(f.n_calibration), int(task.cfg.seed)
                        )
                    },
                ),
            )
    total = sum(p.numel() for p in unet.parameters())
    blocks = selected_blocks(unet, s.get("mask"))
    trainable = prepare(unet, s.method, blocks, int(s.get("rank", 4)))
    if trainable:
        losses = finetune(
            task.pipe, latents, captions, s, seed=int(task.cfg.seed), ckpt_dir=task.run_dir / CHECKPOINTS, tau=tau
        )
    else:
        log.warning("mitigation.mask selects no transformer block: the model is published unchanged")
        losses = []
    if not distributed.is_main():  # rank 0 publishes
        return {}
    write_parquet(task.run_dir / TRAIN_LOG, pd.DataFrame(losses))
    published = "adapter" if s.method == "lora" and s.get("publish", "adapter") == "adapter" else "pipeline"
    if published == "adapter":  # MBs over the base model, not a pipeline copy
        save_adapter(task.run_dir / "model", unet, task.cfg.model.path)
    else:
        merge(unet, s.method)
        save_pipeline(task.pipe, task.run_dir / "model")
    return {
        "method": s.method,
        "published": published,
        "blocks": blocks,
        "trainable_params": int(trainable),
        "trainable_share": trainable / total,
        "tau": tau,
        "final_loss": losses[-1]["loss"] if losses else None,
        "data_parallel": distributed.summary(lambda r, w: fit_items(s, r, w) if trainable else 0),
    }


def build_adversarial_ft(task: MitigationTask) -> dict:
    """Finding Dori's adversarial fine-tuning of the whole UNet."""
    from safetensors.torch import load_file, save_file

    from diffmem.features import build_extractor
    from diffmem.mitigations.adversarial import adversarial_finetune, refreshes, surrogates
    from diffmem.models import save_pipeline

    s, cfg = task.settings, task.cfg
    mem = task.memorised
    if task.negatives.empty:
        raise DataError("adversarial_ft: needs non-memorised prompts (the 'other' trigger inits)")
    target_images = task.images(mem["target_file"])
    target_cond = task.cond(mem["caption"])
    sur_file = task.run_dir / "surrogates.safetensors"

    def make_surrogates() -> None:
        extractor = build_extractor(cfg.features.extractor, device=str(task.pipe.unet.device))
        images, table = surrogates(
            task.pipe,
            extractor,
            target_cond,
            target_images,
            mem["prompt_id"],
            s.surrogate,
            seed=int(cfg.seed),
            threshold=float(cfg.features.replication_threshold),
            **task.sampling(),
        )
        write_parquet(task.run_dir / "surrogates.parquet", table.assign(caption=mem["caption"].to_numpy()))
        with atomic_path(sur_file) as tmp:
            save_file({"images": images.contiguous()}, str(tmp))

    sur = resumed(sur_file, lambda p: load_file(str(p))["images"], make_surrogates)
    rows = task.train_rows()
    rows = rows[~rows["caption"].isin(set(mem["caption"]))]
    if "kind" in rows:
        rows = rows[rows["kind"] == "ordinary"]
    rows = rows.reset_index(drop=True)
    unique = sorted(set(rows["caption"]))
    util_cond = task.cond(unique)[_positions(rows["caption"], unique)]
    losses = adversarial_finetune(
        task.pipe,
        task.latents(rows),
        util_cond,
        target_images,
        target_cond,
        sur,
        task.cond(task.negatives["caption"]),
        s,
        seed=int(cfg.seed),
        ckpt_dir=task.run_dir / CHECKPOINTS,
        run_dir=task.run_dir,
    )
    if not distributed.is_main():  # rank 0 publishes
        return {}
    write_parquet(task.run_dir / TRAIN_LOG, pd.DataFrame(losses))
    save_pipeline(task.pipe, task.run_dir / "model")
    return {
        "n_targets": len(mem),
        "n_utility_rows": len(rows),
        "trigger_refreshes": refreshes(task.run_dir),
        "surrogates_replicating": int(pd.read_parquet(task.run_dir / "surrogates.parquet")["replicates"].sum()),
        "final_loss": losses[-1]["loss"] if losses else None,
        "data_parallel": distributed.summary(lambda r, w: fit_items(s, r, w)),
    }
