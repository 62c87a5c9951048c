"""``diffmem generate``: sample images for a prompt list, one seed per sample.

Writes a generate run (:mod:`diffmem.data.samples`: one PNG per sample, the prompt list
and the samples table, one row per image with ids, caption, seed, sampler settings and the
prompt's metadata) plus ``info.json``. Resumable and shardable: the plan of samples is a pure function of the
config, a re-run generates only missing images, and shard ``i`` of ``n`` takes every
n-th sample, so array jobs split the work with no overlap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from diffmem import distributed
from diffmem.checks import check_shard
from diffmem.config import hydra_app
from diffmem.data.prompts import stage_prompts, warn_long_prompts
from diffmem.data.samples import PROMPTS, SAMPLES, drop_damaged, plan_samples
from diffmem.device import configure_torch
from diffmem.loading import load_model
from diffmem.models.pipeline import check_scheduler
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.runs import require, write_parquet
from diffmem.sampling import check_resolution, generate_images

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prompts and the plan of samples (a pure function of the config), after the checks the
    schema (:mod:`diffmem.schema`) cannot make field by field."""
    check_shard(cfg.shard, cfg.num_shards)
    check_scheduler(cfg.scheduler)
    require(cfg.model, "path", prefix="model.", hint="a diffusers pipeline folder or HF-cache repo id")
    prompts = stage_prompts(cfg)
    return prompts, plan_samples(prompts, cfg.n_per_prompt, cfg.seed)


def body(job: Job) -> Outcome:
    """Generate this shard's missing (or damaged) samples; the last shard publishes the table."""
    cfg, run_dir, (prompts, plan) = job.cfg, job.dir, job.ctx
    device = configure_torch(cfg)
    mine = plan.iloc[cfg.shard :: cfg.num_shards]
    pipe = load_model(cfg.model, device, scheduler=cfg.scheduler)
    warn_long_prompts(prompts["caption"], pipe.tokenizer)
    check_resolution(pipe, cfg.resolution)
    if distributed.is_main():  # rank 0 alone writes the run dir's own files
        write_parquet(run_dir / PROMPTS, prompts)
        drop_damaged(run_dir, mine["file"])  # a resumed run recomputes damaged samples
    distributed.barrier("generate: damaged samples dropped")
    generate_images(
        pipe,
        mine,
        run_dir,
        resolution=cfg.resolution,
        steps=cfg.steps,
        guidance=cfg.guidance_scale,
        batch_size=cfg.batch_size,
        shard=True,
    )
    distributed.barrier("generate: samples written")
    if not distributed.is_main():  # rank 0 publishes
        return Outcome(complete=False)
    missing = sum(not (run_dir / f).exists() for f in plan["file"])
    if missing:  # other shards still running: the last one to finish publishes the table
        log.info("generate: shard %d/%d done; %d samples of other shards missing", cfg.shard, cfg.num_shards, missing)
        return Outcome(complete=False)
    table = plan.assign(
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        scheduler=cfg.scheduler,
        resolution=cfg.resolution,
        model=cfg.model.name,
    )
    write_parquet(run_dir / SAMPLES, table)
    return Outcome(
        {"samples": len(table)},
        info={
            "data_parallel": distributed.summary(
                lambda r, w: len(distributed.shard_rows(len(mine), cfg.batch_size, r, w))
            )
        },
    )


SPEC = StageSpec("generate", body, prepare, inputs=lambda cfg, ctx: {"prompt list": ctx[0]}, data_parallel=True)
run = SPEC.run
main = hydra_app("generate", run)

if __name__ == "__main__":
    main()
