"""The probe studies ``diffmem probe`` runs (registered in ``PROBES``): trigger search, NeMo,
Wanda, locality, and Finding Dori's table.

Each probe is ``fn(ctx, settings) -> (tables, metrics)``: ``ctx``
(:class:`~diffmem.probes.context.ProbeContext`) holds the model, the descriptor, the memorised
targets with their training images, the non-memorised prompts and the control images;
``settings`` is the probe's config. Expensive pieces (one target's trigger search, one
prompt's localisation) are stored as parts under the run dir and reused when a killed run
is re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diffmem import distributed
from diffmem.probes import nemo as nemo_lib
from diffmem.probes import wanda as wanda_lib
from diffmem.probes.context import ProbeContext, attack, attack_summary, baseline_summary, prompt_keys, trigger_settings
from diffmem.probes.layers import block_neurons
from diffmem.probes.trigger import load_triggers, trigger_file
from diffmem.probes.wanda import pruned

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from diffmem.detectors.base import Detector

    NemoSetup = tuple[list[str], nemo_lib.ActivationStats, Detector, float]  # what nemo_setup prepares


def trigger_search(ctx: ProbeContext, s: DictConfig) -> tuple[dict, dict]:
    """Finding Dori's trigger search on the loaded model, for the memorised targets and the controls."""
    ts = trigger_settings(s)
    base = ctx.baseline("original")
    parts = [attack(ctx, "target", i, ts, f"attack-original-target-{i}") for i in _bar(len(ctx.targets), "targets")]
    parts += [attack(ctx, "control", i, ts, f"attack-original-control-{i}") for i in range(len(ctx.controls))]
    triggers = pd.concat(parts, ignore_index=True)
    metrics = {
        "baseline": baseline_summary(ctx, base),
        "attack": attack_summary(ctx, triggers[triggers["role"] == "target"]),
    }
    if len(ctx.controls):
        metrics["control"] = attack_summary(ctx, triggers[triggers["role"] == "control"])
    return {"triggers": triggers, "baseline": base}, metrics


def _bar(n: int, desc: str) -> Iterable[int]:
    return tqdm(range(n), desc=desc, mininterval=2, disable=n <= 1)


def nemo_setup(ctx: ProbeContext, s: DictConfig) -> NemoSetup:
    """Layers, activation statistics of the non-memorised prompts, detector and its threshold."""
    from diffmem.detectors import build_detector

    layers = nemo_lib.nemo_layers(ctx.pipe, tuple(s.blocks))
    stats = nemo_lib.ActivationStats.fit(nemo_lib.value_activations(ctx.pipe, ctx.negative_cond, layers))
    detector = build_detector(s.detector)
    if s.get("threshold") is not None:
        threshold = float(s.threshold)
    else:
        neg = detector.score_conditioning(
            ctx.pipe, ctx.negative_cond, ctx.negatives["prompt_id"].tolist(), seed=ctx.seed, resolution=ctx.resolution
        )
        threshold = float(neg.mean() + neg.std(ddof=1))
    return layers, stats, detector, threshold


def localise_one(ctx: ProbeContext, setup: NemoSetup, cond: torch.Tensor, prompt_id: int, s: DictConfig) -> dict:
    """NeMo's neurons for one conditioning, as a JSON-ready dict."""
    layers, stats, detector, threshold = setup
    z = {k: v[0] for k, v in stats.zscores(nemo_lib.value_activations(ctx.pipe, cond[None], layers)).items()}
    score = nemo_lib.blocked_score(ctx.pipe, detector, cond, prompt_id, seed=ctx.seed, resolution=ctx.resolution)
    found = nemo_lib.localise(
        z,
        score,
        threshold,
        theta_start=float(s.theta_start),
        theta_step=float(s.theta_step),
        theta_min=float(s.theta_min),
        refine=bool(s.refine),
        max_checks=s.get("max_checks"),
    )
    return {
        "neurons": found.neurons,
        "n_neurons": found.n_neurons,
        "score_before": found.score_before,
        "score_after": found.score_after,
        "suppressed": found.suppressed,
        "checks": found.checks,
        "threshold": threshold,
    }


def _nemo_all(ctx: ProbeContext, s: DictConfig) -> list[dict]:
    """NeMo's search per target (a sequential search each: the ranks of a split stage take a share of the targets)."""
    setup = nemo_setup(ctx, s)

    def localise(idx: np.ndarray) -> list[dict]:
        return [
            ctx.json_part(
                f"nemo-{int(r.prompt_id)}",
                partial(localise_one, ctx, setup, ctx.target_cond[i], int(r.prompt_id), s),
            )
            for _, i, r in zip(_bar(len(idx), "nemo"), idx, ctx.targets.iloc[idx].itertuples())
        ]

    return distributed.deal(len(ctx.targets), localise)


def _blocked_replication(ctx: ProbeContext, found: list[dict]) -> pd.DataFrame:
    """Each target's generations with its neurons blocked (the ranks of a split stage take a share of the targets)."""

    def replicate(idx: np.ndarray) -> list[pd.DataFrame]:
        parts = []
        for i in idx:
            with block_neurons(ctx.pipe.unet, found[i]["neurons"]):
                parts.append(
                    ctx.replication(
                        ctx.target_cond[i : i + 1],
                        ctx.target_images[i : i + 1],
                        prompt_keys(ctx.targets.iloc[i : i + 1]),
                    )
                )
        return parts

    return pd.concat(distributed.deal(len(found), replicate), ignore_index=True)


def nemo(ctx: ProbeContext, s: DictConfig) -> tuple[dict, dict]:
    """NeMo's neurons per memorised prompt, and MR with them blocked (``neurons.json``)."""
    found = _nemo_all(ctx, s)
    if distributed.writes():
        nemo_lib.save_neurons(ctx.run_dir, dict(zip(ctx.targets["prompt_id"], found)))
    base = ctx.baseline("original")
    blocked = ctx.part("baseline-nemo", lambda: _blocked_replication(ctx, found))
    table = prompt_keys(ctx.targets).assign(
        **{k: [f[k] for f in found] for k in ("n_neurons", "score_before", "score_after", "suppressed", "checks")}
    )
    return {"nemo": table, "baseline": base, "blocked": blocked}, {
        "original": baseline_summary(ctx, base),
        "nemo": baseline_summary(ctx, blocked),
        "threshold": found[0]["threshold"] if found else None,
        "median_neurons": float(table["n_neurons"].median()) if len(table) else None,
        "suppressed_share": float(table["suppressed"].mean()) if len(table) else None,
    }


def wanda_masks_for(
    ctx: ProbeContext, conds: torch.Tensor, s: DictConfig, prompt_ids: Iterable[int]
) -> wanda_lib.Masks:
    """Union of the Wanda masks of several conditionings (seeds per prompt as in generation)."""
    return wanda_lib.prompt_masks(
        ctx.pipe,
        conds,
        prompt_ids,
        seed=ctx.seed,
        n_seeds=int(s.n_seeds),
        resolution=ctx.resolution,
        steps=ctx.steps,
        guidance=ctx.guidance,
        n_steps=int(s.n_steps),
        fraction=float(s.fraction),
    )


def _wanda_model(ctx: ProbeContext, s: DictConfig) -> wanda_lib.Masks:
    path = ctx.run_dir / wanda_lib.MASKS_FILE
    if path.exists():
        return wanda_lib.load_masks(path)
    masks = wanda_masks_for(ctx, ctx.target_cond, s, ctx.targets["prompt_id"])
    if distributed.writes():
        wanda_lib.save_masks(path, masks)
    return masks


def _save_pruned(ctx: ProbeContext, s: DictConfig) -> None:
    """The pruned pipeline as ``model/`` (diffusers format: any stage takes it as ``model=local``)."""
    from diffmem.models.pipeline import is_pipeline_dir, save_pipeline

    if s.get("save_model", True) and distributed.writes() and not is_pipeline_dir(ctx.run_dir / "model"):
        save_pipeline(ctx.pipe, ctx.run_dir / "model")


def wanda(ctx: ProbeContext, s: DictConfig) -> tuple[dict, dict]:
    """Wanda masks over the memorised prompts (``masks.safetensors``), the pruned model (``model/``),
    and MR before and after pruning."""
    masks = _wanda_model(ctx, s)
    base = ctx.baseline("original")
    with pruned(ctx.pipe.unet, masks):
        after = ctx.baseline("wanda")
        _save_pruned(ctx, s)
    counts = pd.DataFrame([{"layer": k, "pruned": int(v.sum()), "weights": int(v.numel())} for k, v in masks.items()])
    return {"wanda": counts, "baseline": base, "pruned": after}, {
        "original": baseline_summary(ctx, base),
        "wanda": baseline_summary(ctx, after),
        "pruned_weights": int(counts["pruned"].sum()),
        "pruned_share": float(counts["pruned"].sum() / counts["weights"].sum()),
    }


def finding_dori(ctx: ProbeContext, s: DictConfig) -> tuple[dict, dict]:
    """Finding Dori's table: original, NeMo- and Wanda-mitigated models, each without and under
    trigger search; plus the control (non-memorised training images) at the same budget."""
    ts = trigger_settings(s.trigger)
    rows: list[dict[str, Any]] = []
    tables: dict[str, pd.DataFrame] = {}
    base = ctx.baseline("original")
    orig_attack = pd.concat(
        [
            attack(ctx, "target", i, ts, f"attack-original-target-{i}")
            for i in _bar(len(ctx.targets), "attack original")
        ],
        ignore_index=True,
    )
    rows += [
        {"model": "original", "attack": "none", **baseline_summary(ctx, base)},
        {"model": "original", "attack": "trigger_search", **attack_summary(ctx, orig_attack)},
    ]

    found = _nemo_all(ctx, s.nemo)
    blocked = ctx.part("baseline-nemo", lambda: _blocked_replication(ctx, found))
    nemo_attack = pd.concat(
        [
            attack(ctx, "target", i, ts, f"attack-nemo-target-{i}", partial(block_neurons, ctx.pipe.unet, f["neurons"]))
            for i, f in zip(_bar(len(ctx.targets), "attack nemo"), found)
        ],
        ignore_index=True,
    )
    rows += [
        {
            "model": "nemo",
            "attack": "none",
            **baseline_summary(ctx, blocked),
            "median_neurons": float(np.median([f["n_neurons"] for f in found])),
        },
        {"model": "nemo", "attack": "trigger_search", **attack_summary(ctx, nemo_attack)},
    ]

    masks = _wanda_model(ctx, s.wanda)
    with pruned(ctx.pipe.unet, masks):
        after = ctx.baseline("wanda")
        _save_pruned(ctx, s.wanda)
        wanda_attack = pd.concat(
            [attack(ctx, "target", i, ts, f"attack-wanda-target-{i}") for i in _bar(len(ctx.targets), "attack wanda")],
            ignore_index=True,
        )
        control = pd.concat(
            [attack(ctx, "control", i, ts, f"attack-wanda-control-{i}") for i in range(len(ctx.controls))]
            or [pd.DataFrame()],
            ignore_index=True,
        )
    rows += [
        {"model": "wanda", "attack": "none", **baseline_summary(ctx, after)},
        {"model": "wanda", "attack": "trigger_search", **attack_summary(ctx, wanda_attack)},
    ]
    if len(control):
        rows.append(
            {
                "model": "wanda",
                "attack": "trigger_search (control: non-memorised images)",
                **attack_summary(ctx, control),
            }
        )
    table = pd.DataFrame(rows)
    tables.update(
        finding_dori=table,
        triggers=pd.concat(
            [orig_attack.assign(model="original"), nemo_attack.assign(model="nemo"), wanda_attack.assign(model="wanda")]
            + ([control.assign(model="wanda")] if len(control) else []),
            ignore_index=True,
        ),
    )
    by = {f"{r['model']}/{r['attack']}": {"mr": r["mr"], "similarity": r["similarity"]} for r in rows}
    return tables, {"table": by, "trigger_budget": ts}


def locality(ctx: ProbeContext, s: DictConfig) -> tuple[dict, dict]:
    """Are a memorised image's triggers local? Per target: pairwise distances between its
    triggers, activation similarity between them vs between different memorised prompts, and
    the IoU of the NeMo and Wanda masks computed from different triggers."""
    ts = trigger_settings(s.trigger)
    n = min(len(ctx.targets), int(s.max_targets))
    setup = nemo_setup(ctx, s.nemo)
    layers = setup[0]
    prompt_acts = _flat(nemo_lib.value_activations(ctx.pipe, ctx.target_cond, layers))
    between_acts = _mean_pairwise(prompt_acts, _cosine) if len(prompt_acts) > 1 else float("nan")
    between_dist = _mean_pairwise(ctx.target_cond.flatten(1).numpy(), _l2) if len(ctx.target_cond) > 1 else float("nan")
    rows = []
    for i in _bar(n, "locality"):
        key = f"locality-target-{i}"
        table = attack(ctx, "target", i, ts, key)
        embs = load_triggers(trigger_file(ctx.run_dir, key))
        pid = int(ctx.targets.iloc[i].prompt_id)
        ok = table.groupby("restart")["similarity"].max().gt(ctx.threshold).to_numpy()
        use = embs[torch.as_tensor(ok)] if ok.sum() >= 2 else embs
        acts = _flat(nemo_lib.value_activations(ctx.pipe, use, layers))

        def masks(
            js: np.ndarray, i: int = i, use: torch.Tensor = use, pid: int = pid
        ) -> list[tuple]:  # per trigger: ranks share
            return [
                (
                    ctx.json_part(f"locality-nemo-{i}-{j}", partial(localise_one, ctx, setup, use[j], pid, s.nemo))[
                        "neurons"
                    ],
                    wanda_masks_for(ctx, use[j][None], s.wanda, [pid]),
                )
                for j in js
            ]

        nemo_masks, wanda_masks = zip(*distributed.deal(len(use), masks))
        rows.append(
            {
                "prompt_id": pid,
                "caption": ctx.targets.iloc[i].caption,
                "triggers": len(embs),
                "replicating_triggers": int(ok.sum()),
                "used_triggers": len(use),
                "trigger_distance": _mean_pairwise(use.flatten(1).numpy(), _l2),
                "distance_from_prompt": float((use - ctx.target_cond[i]).flatten(1).norm(dim=1).mean()),
                "activation_cosine_triggers": _mean_pairwise(acts, _cosine),
                "nemo_iou": _mean_pairwise(nemo_masks, _neuron_iou),
                "wanda_iou": _mean_pairwise(wanda_masks, wanda_lib.mask_iou),
            }
        )
    table = pd.DataFrame(rows)
    return {"locality": table}, {
        "between_prompts": {"embedding_distance": between_dist, "activation_cosine": between_acts},
        "median": {c: float(table[c].median()) for c in table.columns if c not in ("prompt_id", "caption")},
    }


def _flat(acts: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([acts[k] for k in acts], axis=1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def _neuron_iou(a: dict, b: dict) -> float:
    sa = {(k, i) for k, v in a.items() for i in v}
    sb = {(k, i) for k, v in b.items() for i in v}
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _mean_pairwise(items: Sequence[Any] | np.ndarray, fn: Callable[[Any, Any], float]) -> float:
    pairs = list(combinations(range(len(items)), 2))
    if not pairs:
        return float("nan")
    return float(np.mean([fn(items[i], items[j]) for i, j in pairs]))
