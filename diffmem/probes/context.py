"""The probe context and the pieces other stages share with the probes.

:class:`ProbeContext` holds a model, the descriptor and the prompts a probe works on;
:func:`attack` runs Finding Dori's trigger search against the model and scores the
triggers' generations (:func:`attack_summary`, :func:`baseline_summary` sum them up);
:func:`check_settings` checks probe-style settings before anything runs. Used by the probes
(:mod:`~diffmem.probes.studies`), ``diffmem evaluate-mitigation`` and ``diffmem mitigate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from diffmem import distributed
from diffmem.checks import check_positive
from diffmem.errors import ConfigError
from diffmem.metrics import memorisation_rate
from diffmem.probes.replication import mr, replication_table
from diffmem.probes.trigger import INITS, TRIGGER_DIR, image_latents, save_triggers, search_triggers, trigger_file
from diffmem.runs import read_json, read_parquet, write_json, write_parquet

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from omegaconf import DictConfig

    from diffmem.features.base import Extractor


@dataclass
class ProbeContext:
    """Everything a probe needs; built by the probe and evaluate-mitigation stages (or a notebook)."""

    pipe: StableDiffusionPipeline
    extractor: Extractor
    targets: pd.DataFrame  # memorised prompts (prompt_id, caption, target_id, ...)
    target_images: torch.Tensor  # [T, 3, H, W] in [0, 1], their training images
    target_cond: torch.Tensor  # [T, tokens, D]
    negatives: pd.DataFrame  # non-memorised prompts
    negative_cond: torch.Tensor
    controls: pd.DataFrame  # non-memorised training images (the control targets)
    control_images: torch.Tensor
    control_cond: torch.Tensor
    run_dir: Path
    seed: int = 0
    resolution: int = 32
    steps: int = 25
    guidance: float = 5.0
    n_per_prompt: int = 4
    threshold: float = 0.7
    mr_reduction: str = "any"
    batch_size: int = 32

    @classmethod
    def build(
        cls,
        pipe: StableDiffusionPipeline,
        extractor: Extractor,
        prompts: tuple[pd.DataFrame, torch.Tensor, pd.DataFrame, pd.DataFrame, torch.Tensor],
        run_dir: Path,
        cfg: Any,
    ) -> ProbeContext:
        """The context of ``prompts`` = (targets, their images, negatives, controls, their images)
        on ``pipe``, their conditionings encoded, with the sampling settings of a stage config
        ``cfg`` (``seed``, ``resolution``, ``steps``, ``guidance_scale``, ``n_per_prompt``,
        ``threshold``, ``mr_reduction``, ``batch_size``)."""
        targets, target_images, negatives, controls, control_images = prompts
        return cls(
            pipe=pipe,
            extractor=extractor,
            targets=targets,
            target_images=target_images,
            target_cond=rows_conditioning(pipe, targets),
            negatives=negatives,
            negative_cond=rows_conditioning(pipe, negatives),
            controls=controls,
            control_images=control_images,
            control_cond=rows_conditioning(pipe, controls),
            run_dir=Path(run_dir),
            seed=int(cfg.seed),
            resolution=int(cfg.resolution),
            steps=int(cfg.steps),
            guidance=float(cfg.guidance_scale),
            n_per_prompt=int(cfg.n_per_prompt),
            threshold=float(cfg.threshold),
            mr_reduction=str(cfg.mr_reduction),
            batch_size=int(cfg.batch_size),
        )

    def part(self, key: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """``compute()`` once: stored as ``parts/<key>.parquet`` and read back on a re-run."""
        return _cached(self.run_dir / "parts" / f"{key}.parquet", compute, read_parquet, write_parquet)

    def json_part(self, key: str, compute: Callable[[], dict]) -> dict:
        """:meth:`part` for a JSON-ready dict (``parts/<key>.json``)."""
        return _cached(self.run_dir / "parts" / f"{key}.json", compute, read_json, write_json)

    def replication(
        self, cond: torch.Tensor, images: torch.Tensor, keys: pd.DataFrame, image_dir: Path | None = None
    ) -> pd.DataFrame:
        """Generations of each conditioning row scored against its row of ``images``."""
        return replication_table(
            self.pipe,
            self.extractor,
            cond,
            images,
            keys,
            n_per_prompt=self.n_per_prompt,
            seed=self.seed,
            resolution=self.resolution,
            steps=self.steps,
            guidance=self.guidance,
            batch_size=self.batch_size,
            image_dir=image_dir,
        )

    def baseline(self, model: str) -> pd.DataFrame:
        """The memorised prompts' own generations on the model as it is now (part ``baseline-<model>``)."""
        return self.part(
            f"baseline-{model}",
            lambda: self.replication(self.target_cond, self.target_images, prompt_keys(self.targets)),
        )

    def mr(self, table: pd.DataFrame, by: str = "prompt_id") -> float:
        return mr(table, self.threshold, by=by, reduction=self.mr_reduction)


def rows_conditioning(pipe: StableDiffusionPipeline, rows: pd.DataFrame) -> torch.Tensor:
    """The text conditioning of ``rows``' captions (float32, CPU; empty rows give an empty tensor)."""
    from diffmem.sampling import encode_prompts

    return encode_prompts(pipe, rows["caption"].tolist()).float().cpu() if len(rows) else torch.zeros(0)


def _cached(
    path: Path, compute: Callable[[], Any], read: Callable[[Path], Any], write: Callable[[Path, Any], object]
) -> Any:
    """Read ``path``, or compute and write it. The ranks of a split stage compute it together
    (rank 0 writes) and go on once it and the files written with it are there."""
    if path.exists():
        return read(path)
    value = compute()
    if distributed.writes():
        write(path, value)
    if distributed.splitting():
        distributed.barrier(f"part {path.name} written")
    return value


def trigger_settings(s: DictConfig) -> dict:
    """The trigger-search budget of a ``trigger`` config node, as :func:`attack` takes it."""
    inits = list(s.get("inits") or ["prompt"])
    return dict(steps=int(s.steps), lr=float(s.lr), batch_size=int(s.batch_size), restarts=int(s.restarts), inits=inits)


def prompt_keys(rows: pd.DataFrame) -> pd.DataFrame:
    """The ``prompt_id``/``caption`` columns of ``rows`` (the keys of a replication table)."""
    return rows[["prompt_id", "caption"]].reset_index(drop=True)


def attack(
    ctx: ProbeContext,
    role: str,
    i: int,
    ts: dict,
    key: str,
    blocked: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> pd.DataFrame:
    """Trigger search for target ``i`` of ``role`` (``target`` or ``control``), then generations
    from every trigger scored against that target; one row per (restart, generation).

    The triggers are saved as ``triggers/<key>.safetensors`` (:func:`~diffmem.probes.trigger.trigger_file`)
    and their generations as PNGs under ``triggers/<key>/`` (``image`` column). ``blocked()`` is active during
    the search and the generations (NeMo's blocking for the mitigated model).
    """
    rows, images, cond = (
        (ctx.targets, ctx.target_images, ctx.target_cond)
        if role == "target"
        else (ctx.controls, ctx.control_images, ctx.control_cond)
    )
    row = rows.iloc[i]

    def compute() -> pd.DataFrame:
        x0 = image_latents(ctx.pipe, images[i : i + 1])
        with blocked():
            found = search_triggers(
                ctx.pipe, x0, cond[i], prompt_id=int(row.prompt_id), seed=ctx.seed, other_conds=ctx.negative_cond, **ts
            )
            embs = torch.stack([t.embedding for t in found])
            keys = pd.DataFrame(
                {
                    "prompt_id": int(row.prompt_id),
                    "caption": str(row.caption),
                    "restart": range(len(found)),
                    "init": [t.init for t in found],
                    "distance": [t.distance for t in found],
                    "final_loss": [t.losses[-1] for t in found],
                }
            )
            table = ctx.replication(
                embs, images[i : i + 1].expand(len(found), -1, -1, -1), keys, image_dir=ctx.run_dir / TRIGGER_DIR / key
            )
            table["image"] = f"{TRIGGER_DIR}/{key}/" + table["image"]
        if distributed.writes():
            save_triggers(trigger_file(ctx.run_dir, key), embs)
        return table.assign(role=role)

    return ctx.part(key, compute)


def attack_summary(ctx: ProbeContext, table: pd.DataFrame) -> dict:
    """MR under attack (a target counts through its best restart) and that restart's similarity."""
    per = table.groupby(["prompt_id", "restart"])
    rates = per["similarity"].apply(
        lambda s: memorisation_rate({0: s.to_numpy()}, ctx.threshold, reduction=ctx.mr_reduction)
    )
    sims = per["similarity"].mean()
    best = pd.DataFrame({"rate": rates, "sim": sims}).sort_values(["rate", "sim"]).groupby(level=0).tail(1)
    return {
        "mr": float(best["rate"].mean()),
        "similarity": float(best["sim"].mean()),
        "n_targets": int(best.shape[0]),
        "median_distance": float(table["distance"].median()),
    }


def baseline_summary(ctx: ProbeContext, table: pd.DataFrame) -> dict:
    """MR and mean similarity of the prompts' own generations (a :meth:`ProbeContext.baseline` table)."""
    return {
        "mr": ctx.mr(table),
        "similarity": float(table.groupby("prompt_id")["similarity"].mean().mean()),
        "n_targets": int(table["prompt_id"].nunique()),
    }


def check_settings(name: str, s: DictConfig, prefix: str = "probe") -> None:
    """Config errors before anything runs (bad values name the field)."""

    def positive(node: DictConfig, at: str) -> None:
        for f in ("steps", "batch_size", "restarts"):
            if f in node:
                check_positive(node[f], f"{at}.{f}")
        if "lr" in node and not float(node.lr) > 0:
            raise ConfigError(f"{at}.lr must be > 0 (got {node.lr})")
        bad = [i for i in node.get("inits") or [] if i not in INITS]
        if bad:
            raise ConfigError(f"{at}.inits: unknown init(s) {bad} (known: {', '.join(INITS)})")

    if name == "trigger_search":
        positive(s, prefix)
    if "trigger" in s:
        positive(s.trigger, f"{prefix}.trigger")
    for node, where in ((s, prefix), (s.get("nemo"), f"{prefix}.nemo")):
        if node is not None and "max_checks" in node:
            check_positive(node.max_checks, f"{where}.max_checks", optional=True)
    for node, where in ((s, prefix), (s.get("wanda"), f"{prefix}.wanda"), (s.get("surrogate"), f"{prefix}.surrogate")):
        if node is not None and "fraction" in node and not 0 < float(node.fraction) <= 1:
            raise ConfigError(f"{where}.fraction must be in (0, 1] (got {node.fraction})")
