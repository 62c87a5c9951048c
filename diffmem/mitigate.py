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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from diffmem import distributed
from diffmem.config import hydra_app
from diffmem.data import load_dataset
from diffmem.data.prompts import stage_prompts
from diffmem.data.selection import check_targets, split_prompts
from diffmem.device import configure_torch
from diffmem.errors import ConfigError
from diffmem.loading import load_model
from diffmem.mitigations import MITIGATIONS
from diffmem.mitigations.builders import MitigationTask, sampler_settings
from diffmem.mitigations.objectives import measure_objectives, measured_objectives, read_objectives
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.sampling import get_hooks
from diffmem.training import CHECKPOINTS, drop_checkpoints

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> Callable[..., Any]:
    """The kind's builder, after checking the settings (nothing is written before this)."""
    s = cfg.mitigation
    fn = MITIGATIONS.get(s.kind)
    if s.kind == "adversarial_ft":
        from diffmem.probes.context import check_settings

        check_settings("adversarial_ft", s, prefix="mitigation")
    return fn


def prepare(cfg: DictConfig) -> tuple[Callable[..., Any], Path, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The builder, the data and the memorised / other prompts, all checked before anything is written."""
    fn = check_config(cfg)
    root, manifest = load_dataset(cfg.data)
    prompts = stage_prompts(cfg, manifest)
    positives = cast(
        "dict[str, Any] | None", OmegaConf.to_container(cfg.positives, resolve=True) if cfg.get("positives") else None
    )
    memorised, negatives = (t.reset_index(drop=True) for t in split_prompts(prompts, positives, "mitigate"))
    if cfg.mitigation.kind == "adversarial_ft":  # fine-tunes against the memorised training images
        check_targets(memorised, "mitigate mitigation=adversarial_ft")
    return fn, root, manifest, prompts, memorised, negatives


def body(job: Job) -> Outcome:
    cfg, run_dir = job.cfg, job.dir
    fn, root, manifest, _, memorised, negatives = job.ctx
    pipe = load_model(cfg.model, configure_torch(cfg), scheduler=cfg.scheduler)
    if get_hooks(pipe) is not None:
        raise ConfigError(f"model.path {cfg.model.path} is an inference-time defence; mitigate a plain model")
    if not (distributed.is_main() or cfg.mitigation.kind in ("finetune", "adversarial_ft")):
        return Outcome(complete=False)  # rank 0 builds a defence alone; the other ranks share fine-tunes only
    torch.manual_seed(int(cfg.seed))
    start = time.perf_counter()
    summary = fn(
        MitigationTask(
            cfg=cfg, pipe=pipe, root=root, manifest=manifest, memorised=memorised, negatives=negatives, run_dir=run_dir
        )
    )
    if not distributed.is_main():  # rank 0 publishes
        return Outcome(complete=False)
    seconds = time.perf_counter() - start
    if cfg.objectives.enabled:
        summary["objectives"] = measured_objectives(
            run_dir,
            lambda: measure_objectives(cfg, run_dir / "model", root, manifest, memorised, sampler_settings(cfg)),
        )
    log.info("mitigate: %s in %.0f s -> %s", cfg.mitigation.name, seconds, run_dir / "model")
    dp = summary.pop("data_parallel", distributed.summary(lambda r, w: 0))
    return Outcome(
        {"mitigation": cfg.mitigation.name, "model": str(run_dir / "model")},
        {"data_parallel": dp},
        {
            "mitigation": cfg.mitigation.name,
            "kind": cfg.mitigation.kind,
            "model": cfg.model.name,
            "seconds": seconds,
            **summary,
        },
    )


#: generations per batch do not change results (tests/test_runner.py), checkpoints are resume state, and
#: ``total_trials`` is the size of a MemControl study, not a setting of its trials
SPEC = StageSpec(
    "mitigate",
    body,
    prepare,
    volatile=("batch_size", "keep_checkpoints", "total_trials"),
    inputs=lambda cfg, ctx: {"prompt list": ctx[3]},
    scratch=(CHECKPOINTS,),
    after=lambda job: drop_checkpoints(job.dir, bool(job.cfg.get("keep_checkpoints", False))),
    data_parallel=True,
)
run = SPEC.run


def task(cfg: DictConfig) -> list[float] | None:
    """The Hydra task: runs :func:`run`; returns ``[memorisation, fd]`` (the Optuna objectives)
    when ``objectives.enabled``."""
    run_dir = run(cfg)
    if cfg.objectives.enabled and distributed.is_main():
        o = read_objectives(run_dir)
        return [o["memorisation"], o["fd"]]
    return None


main = hydra_app("mitigate", task)

if __name__ == "__main__":
    main()
