"""``diffmem generate``: sample images for a prompt list, one seed per sample.

Writes a generate run (:mod:`diffmem.data.samples`: one PNG per sample, the prompt list
and the samples table, one row per image with ids, caption, seed, sampler settings and the
prompt's metadata) plus ``info.json``. Resumable and shardable: the plan of samples is a pure function of the
config, a re-run generates only missing images, and shard ``i`` of ``n`` takes every
n-th sample, so array jobs split the work with no overlap.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from diffmem import distributed
from diffmem.checks import check_shard
from diffmem.config import hydra_app
from diffmem.device import configure_torch
from diffmem.data.images import without_guards
from diffmem.data.prompts import needs_dataset, stage_prompts, warn_long_prompts
from diffmem.data.samples import PROMPTS, SAMPLES, drop_damaged, plan_samples, samples_intact
from diffmem.loading import load_model
from diffmem.models.pipeline import check_scheduler
from diffmem.runs import check_claim, check_inputs, claim, config_subset, finish, is_done, require, write_parquet
from diffmem.sampling import check_resolution, generate_images

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """What the schema (:mod:`diffmem.schema`) cannot check field by field."""
    check_shard(cfg.shard, cfg.num_shards)
    check_scheduler(cfg.scheduler)
    require(cfg.model, "path", prefix="model.", hint="a diffusers pipeline folder or HF-cache repo id")


def fingerprint(cfg: DictConfig) -> dict:
    keys = ["model", "prompts", "seed", "n_per_prompt", "steps", "guidance_scale", "scheduler",
            "resolution", "num_shards", "batch_size"] + (["data"] if needs_dataset(cfg) else [])
    fp = config_subset(cfg, keys)
    return {**fp, "data": without_guards(fp["data"])} if "data" in fp else fp


def run(cfg: DictConfig) -> Path:
    """Generate per ``cfg``; returns the run dir (its samples table once every shard is done)."""
    check_config(cfg)
    # Config, prompts and model are checked before the run dir is claimed: a refused run
    # creates nothing (and a later run with the corrected config is not refused).
    if check_claim(cfg.run_dir, fingerprint(cfg)) and is_done(cfg.run_dir) and samples_intact(cfg.run_dir):
        log.info("generate: %s is complete", cfg.run_dir)
        return Path(cfg.run_dir)
    device = configure_torch(cfg)
    prompts = stage_prompts(cfg)
    plan = plan_samples(prompts, cfg.n_per_prompt, cfg.seed)
    mine = plan.iloc[cfg.shard::cfg.num_shards]
    pipe = load_model(cfg.model, device, scheduler=cfg.scheduler)
    warn_long_prompts(prompts["caption"], pipe.tokenizer)
    check_resolution(pipe, cfg.resolution)
    run_dir = Path(cfg.run_dir)
    if distributed.is_main():  # rank 0 alone writes the run dir's own files
        run_dir = claim(cfg.run_dir, fingerprint(cfg))
        check_inputs(run_dir, "prompt list", prompts)
        write_parquet(run_dir / PROMPTS, prompts)
        drop_damaged(run_dir, mine["file"])  # a resumed run recomputes damaged samples
    distributed.barrier("generate: run dir claimed")
    generate_images(pipe, mine, run_dir, resolution=cfg.resolution, steps=cfg.steps,
                    guidance=cfg.guidance_scale, batch_size=cfg.batch_size, shard=True)
    distributed.barrier("generate: samples written")
    if not distributed.is_main():  # rank 0 publishes
        return run_dir
    missing = sum(not (run_dir / f).exists() for f in plan["file"])
    if missing:  # other shards still running: the last one to finish publishes the table
        log.info("generate: shard %d/%d done; %d samples of other shards missing",
                 cfg.shard, cfg.num_shards, missing)
        return run_dir
    table = plan.assign(steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                        scheduler=cfg.scheduler, resolution=cfg.resolution, model=cfg.model.name)
    write_parquet(run_dir / SAMPLES, table)
    return finish(run_dir, cfg, {"samples": len(table)}, data_parallel=distributed.summary(
        lambda r, w: len(distributed.shard_rows(len(mine), cfg.batch_size, r, w))))


main = hydra_app("generate", run)

if __name__ == "__main__":
    main()
