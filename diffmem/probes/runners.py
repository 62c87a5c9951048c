"""The probes ``diffmem probe`` runs: trigger search, NeMo, Wanda, locality, and Finding Dori's table.

Each probe is ``fn(ctx, settings) -> (tables, metrics)``: ``ctx`` (:class:`ProbeContext`)
holds the model, the descriptor, the memorised targets with their training images, the
non-memorised prompts and the control images; ``settings`` is the probe's config. Expensive
pieces (one target's trigger search, one prompt's localisation) are stored as parts under
the run dir and reused when a killed run is re-run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diffmem.checks import check_positive
from diffmem.errors import ConfigError
from diffmem.metrics import memorisation_rate
from diffmem.probes import nemo as nemo_lib
from diffmem.probes import wanda as wanda_lib
from diffmem.probes.layers import block_neurons, get_layers
from diffmem.probes.replication import mr, replication_table
from diffmem.probes.trigger import INITS, image_latents, search_triggers
from diffmem.runs import atomic_path, read_json, read_parquet, write_json, write_parquet


@dataclass
class ProbeContext:
    """Everything a probe needs; built by :func:`diffmem.probe.run` (or a notebook)."""

    pipe: object
    extractor: object
    targets: pd.DataFrame          # memorised prompts (prompt_id, caption, target_id, ...)
    target_images: torch.Tensor    # [T, 3, H, W] in [0, 1], their training images
    target_cond: torch.Tensor      # [T, tokens, D]
    negatives: pd.DataFrame        # non-memorised prompts
    negative_cond: torch.Tensor
    controls: pd.DataFrame         # non-memorised training images (the control targets)
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

    def part(self, key: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """``compute()`` once: stored as ``parts/<key>.parquet`` and read back on a re-run."""
        return _cached(self.run_dir / "parts" / f"{key}.parquet", compute, read_parquet, write_parquet)

    def json_part(self, key: str, compute: Callable[[], dict]) -> dict:
        """:meth:`part` for a JSON-ready dict (``parts/<key>.json``)."""
        return _cached(self.run_dir / "parts" / f"{key}.json", compute, read_json, write_json)

    def replication(self, cond: torch.Tensor, images: torch.Tensor, keys: pd.DataFrame,
                    image_dir: Path | None = None) -> pd.DataFrame:
        """Generations of each conditioning row scored against its row of ``images``."""
        return replication_table(self.pipe, self.extractor, cond, images, keys, n_per_prompt=self.n_per_prompt,
                                 seed=self.seed, resolution=self.resolution, steps=self.steps,
                                 guidance=self.guidance, batch_size=self.batch_size, image_dir=image_dir)

    def baseline(self, model: str) -> pd.DataFrame:
        """The memorised prompts' own generations on the model as it is now (part ``baseline-<model>``)."""
        return self.part(f"baseline-{model}", lambda: self.replication(self.target_cond, self.target_images,
                                                                       _keys(self.targets)))

    def mr(self, table: pd.DataFrame, by: str = "prompt_id") -> float:
        return mr(table, self.threshold, by=by, reduction=self.mr_reduction)


def rows_conditioning(pipe, rows: pd.DataFrame) -> torch.Tensor:
    """The text conditioning of ``rows``' captions (float32, CPU; empty rows give an empty tensor)."""
    from diffmem.sampling import encode_prompts

    return encode_prompts(pipe, rows["caption"].tolist()).float().cpu() if len(rows) else torch.zeros(0)


def _cached(path: Path, compute, read, write):
    if path.exists():
        return read(path)
    value = compute()
    write(path, value)
    return value


def _trigger_settings(s) -> dict:
    inits = list(s.get("inits") or ["prompt"])
    return dict(steps=int(s.steps), lr=float(s.lr), batch_size=int(s.batch_size), restarts=int(s.restarts),
                inits=inits)


def _keys(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[["prompt_id", "caption"]].reset_index(drop=True)


def attack(ctx: ProbeContext, role: str, i: int, ts: dict, key: str,
           blocked: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> pd.DataFrame:
    """Trigger search for target ``i`` of ``role`` (``target`` or ``control``), then generations
    from every trigger scored against that target; one row per (restart, generation).

    The triggers are saved as ``triggers/<key>.safetensors`` and their generations as PNGs
    under ``triggers/<key>/`` (``image`` column). ``blocked()`` is active during
    the search and the generations (NeMo's blocking for the mitigated model).
    """
    rows, images, cond = ((ctx.targets, ctx.target_images, ctx.target_cond) if role == "target"
                          else (ctx.controls, ctx.control_images, ctx.control_cond))
    row = rows.iloc[i]

    def compute() -> pd.DataFrame:
        from safetensors.torch import save_file

        x0 = image_latents(ctx.pipe, images[i:i + 1])
        with blocked():
            found = search_triggers(ctx.pipe, x0, cond[i], prompt_id=int(row.prompt_id), seed=ctx.seed,
                                    other_conds=ctx.negative_cond, **ts)
            embs = torch.stack([t.embedding for t in found])
            keys = pd.DataFrame({"prompt_id": int(row.prompt_id), "caption": str(row.caption),
                                 "restart": range(len(found)), "init": [t.init for t in found],
                                 "distance": [t.distance for t in found],
                                 "final_loss": [t.losses[-1] for t in found]})
            table = ctx.replication(embs, images[i:i + 1].expand(len(found), -1, -1, -1), keys,
                                    image_dir=ctx.run_dir / "triggers" / key)
            table["image"] = f"triggers/{key}/" + table["image"]
        path = ctx.run_dir / "triggers" / f"{key}.safetensors"
        with atomic_path(path) as tmp:
            save_file({"triggers": embs.contiguous()}, str(tmp))
        return table.assign(role=role)

    return ctx.part(key, compute)


def attack_summary(ctx: ProbeContext, table: pd.DataFrame) -> dict:
    """MR under attack (a target counts through its best restart) and that restart's similarity."""
    per = table.groupby(["prompt_id", "restart"])
    rates = per["similarity"].apply(lambda s: memorisation_rate({0: s.to_numpy()}, ctx.threshold,
                                                                reduction=ctx.mr_reduction))
    sims = per["similarity"].mean()
    best = pd.DataFrame({"rate": rates, "sim": sims}).sort_values(["rate", "sim"]).groupby(level=0).tail(1)
    return {"mr": float(best["rate"].mean()), "similarity": float(best["sim"].mean()),
            "n_targets": int(best.shape[0]), "median_distance": float(table["distance"].median())}


def baseline_summary(ctx: ProbeContext, table: pd.DataFrame) -> dict:
    return {"mr": ctx.mr(table), "similarity": float(table.groupby("prompt_id")["similarity"].mean().mean()),
            "n_targets": int(table["prompt_id"].nunique())}


def trigger_search(ctx: ProbeContext, s) -> tuple[dict, dict]:
    """Finding Dori's trigger search on the loaded model, for the memorised targets and the controls."""
    ts = _trigger_settings(s)
    base = ctx.baseline("original")
    parts = [attack(ctx, "target", i, ts, f"attack-original-target-{i}") for i in _bar(len(ctx.targets), "targets")]
    parts += [attack(ctx, "control", i, ts, f"attack-original-control-{i}") for i in range(len(ctx.controls))]
    triggers = pd.concat(parts, ignore_index=True)
    metrics = {"baseline": baseline_summary(ctx, base),
               "attack": attack_summary(ctx, triggers[triggers["role"] == "target"])}
    if len(ctx.controls):
        metrics["control"] = attack_summary(ctx, triggers[triggers["role"] == "control"])
    return {"triggers": triggers, "baseline": base}, metrics


def _bar(n: int, desc: str):
    return tqdm(range(n), desc=desc, mininterval=2, disable=n <= 1)


def nemo_setup(ctx: ProbeContext, s):
    """Layers, activation statistics of the non-memorised prompts, detector and its threshold."""
    from diffmem.detectors import build_detector

    layers = nemo_lib.nemo_layers(ctx.pipe, tuple(s.blocks))
    stats = nemo_lib.ActivationStats.fit(nemo_lib.value_activations(ctx.pipe, ctx.negative_cond, layers))
    detector = build_detector(s.detector)
    if s.get("threshold") is not None:
        threshold = float(s.threshold)
    else:
        neg = detector.score_conditioning(ctx.pipe, ctx.negative_cond, ctx.negatives["prompt_id"].tolist(),
                                          seed=ctx.seed, resolution=ctx.resolution)
        threshold = float(neg.mean() + neg.std(ddof=1))
    return layers, stats, detector, threshold


def localise_one(ctx: ProbeContext, setup, cond: torch.Tensor, prompt_id: int, s) -> dict:
    """NeMo's neurons for one conditioning, as a JSON-ready dict."""
    layers, stats, detector, threshold = setup
    z = {k: v[0] for k, v in stats.zscores(nemo_lib.value_activations(ctx.pipe, cond[None], layers)).items()}
    score = nemo_lib.blocked_score(ctx.pipe, detector, cond, prompt_id, seed=ctx.seed, resolution=ctx.resolution)
    found = nemo_lib.localise(z, score, threshold, theta_start=float(s.theta_start),
                              theta_step=float(s.theta_step), theta_min=float(s.theta_min), refine=bool(s.refine))
    return {"neurons": found.neurons, "n_neurons": found.n_neurons, "score_before": found.score_before,
            "score_after": found.score_after, "suppressed": found.suppressed, "checks": found.checks,
            "threshold": threshold}


def _nemo_all(ctx: ProbeContext, s) -> list[dict]:
    setup = nemo_setup(ctx, s)
    return [ctx.json_part(f"nemo-{int(r.prompt_id)}",
                          lambda i=i, r=r: localise_one(ctx, setup, ctx.target_cond[i], int(r.prompt_id), s))
            for i, r in zip(_bar(len(ctx.targets), "nemo"), ctx.targets.itertuples())]


def _blocked_replication(ctx: ProbeContext, found: list[dict]) -> pd.DataFrame:
    parts = []
    for i, f in enumerate(found):
        with block_neurons(ctx.pipe.unet, f["neurons"]):
            parts.append(ctx.replication(ctx.target_cond[i:i + 1], ctx.target_images[i:i + 1],
                                         _keys(ctx.targets.iloc[i:i + 1])))
    return pd.concat(parts, ignore_index=True)


def nemo(ctx: ProbeContext, s) -> tuple[dict, dict]:
    """NeMo's neurons per memorised prompt, and MR with them blocked (``neurons.json``)."""
    found = _nemo_all(ctx, s)
    write_json(ctx.run_dir / "neurons.json", {str(int(r.prompt_id)): f for r, f in
                                              zip(ctx.targets.itertuples(), found)})
    base = ctx.baseline("original")
    blocked = ctx.part("baseline-nemo", lambda: _blocked_replication(ctx, found))
    table = _keys(ctx.targets).assign(**{k: [f[k] for f in found] for k in
                                         ("n_neurons", "score_before", "score_after", "suppressed", "checks")})
    return {"nemo": table, "baseline": base, "blocked": blocked}, {
        "original": baseline_summary(ctx, base), "nemo": baseline_summary(ctx, blocked),
        "threshold": found[0]["threshold"] if found else None,
        "median_neurons": float(table["n_neurons"].median()) if len(table) else None,
        "suppressed_share": float(table["suppressed"].mean()) if len(table) else None}


def wanda_masks_for(ctx: ProbeContext, conds: torch.Tensor, s, prompt_ids) -> wanda_lib.Masks:
    """Union of the Wanda masks of several conditionings (seeds per prompt as in generation)."""
    return wanda_lib.prompt_masks(ctx.pipe, conds, prompt_ids, seed=ctx.seed, n_seeds=int(s.n_seeds),
                                  resolution=ctx.resolution, steps=ctx.steps, guidance=ctx.guidance,
                                  n_steps=int(s.n_steps), fraction=float(s.fraction))


@contextlib.contextmanager
def pruned(unet, masks: wanda_lib.Masks):
    """The UNet with ``masks`` zeroed inside the block; the original weights come back afterwards."""
    layers = get_layers(unet, list(masks))
    saved = {k: m.weight.detach().clone() for k, m in layers.items()}
    try:
        wanda_lib.prune(unet, masks)
        yield
    finally:
        with torch.no_grad():
            for k, m in layers.items():
                m.weight.copy_(saved[k])


def _wanda_model(ctx: ProbeContext, s) -> wanda_lib.Masks:
    from safetensors.torch import load_file, save_file

    path = ctx.run_dir / "masks.safetensors"
    if path.exists():
        return {k: v.bool() for k, v in load_file(str(path)).items()}
    masks = wanda_masks_for(ctx, ctx.target_cond, s, ctx.targets["prompt_id"])
    with atomic_path(path) as tmp:
        save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(tmp))
    return masks


def _save_pruned(ctx: ProbeContext, s) -> None:
    """The pruned pipeline as ``model/`` (diffusers format: any stage takes it as ``model=local``)."""
    from diffmem.models import save_pipeline

    if s.get("save_model", True) and not (ctx.run_dir / "model" / "model_index.json").exists():
        save_pipeline(ctx.pipe, ctx.run_dir / "model")


def wanda(ctx: ProbeContext, s) -> tuple[dict, dict]:
    """Wanda masks over the memorised prompts (``masks.safetensors``), the pruned model (``model/``),
    and MR before and after pruning."""
    masks = _wanda_model(ctx, s)
    base = ctx.baseline("original")
    with pruned(ctx.pipe.unet, masks):
        after = ctx.baseline("wanda")
        _save_pruned(ctx, s)
    counts = pd.DataFrame([{"layer": k, "pruned": int(v.sum()), "weights": int(v.numel())} for k, v in masks.items()])
    return {"wanda": counts, "baseline": base, "pruned": after}, {
        "original": baseline_summary(ctx, base), "wanda": baseline_summary(ctx, after),
        "pruned_weights": int(counts["pruned"].sum()),
        "pruned_share": float(counts["pruned"].sum() / counts["weights"].sum())}


def finding_dori(ctx: ProbeContext, s) -> tuple[dict, dict]:
    """Finding Dori's table: original, NeMo- and Wanda-mitigated models, each without and under
    trigger search; plus the control (non-memorised training images) at the same budget."""
    ts = _trigger_settings(s.trigger)
    rows, tables = [], {}
    base = ctx.baseline("original")
    orig_attack = pd.concat([attack(ctx, "target", i, ts, f"attack-original-target-{i}")
                             for i in _bar(len(ctx.targets), "attack original")], ignore_index=True)
    rows += [{"model": "original", "attack": "none", **baseline_summary(ctx, base)},
             {"model": "original", "attack": "trigger_search", **attack_summary(ctx, orig_attack)}]

    found = _nemo_all(ctx, s.nemo)
    blocked = ctx.part("baseline-nemo", lambda: _blocked_replication(ctx, found))
    nemo_attack = pd.concat([attack(ctx, "target", i, ts, f"attack-nemo-target-{i}",
                                    lambda f=f: block_neurons(ctx.pipe.unet, f["neurons"]))
                             for i, f in zip(_bar(len(ctx.targets), "attack nemo"), found)], ignore_index=True)
    rows += [{"model": "nemo", "attack": "none", **baseline_summary(ctx, blocked),
              "median_neurons": float(np.median([f["n_neurons"] for f in found]))},
             {"model": "nemo", "attack": "trigger_search", **attack_summary(ctx, nemo_attack)}]

    masks = _wanda_model(ctx, s.wanda)
    with pruned(ctx.pipe.unet, masks):
        after = ctx.baseline("wanda")
        _save_pruned(ctx, s.wanda)
        wanda_attack = pd.concat([attack(ctx, "target", i, ts, f"attack-wanda-target-{i}")
                                  for i in _bar(len(ctx.targets), "attack wanda")], ignore_index=True)
        control = pd.concat([attack(ctx, "control", i, ts, f"attack-wanda-control-{i}")
                             for i in range(len(ctx.controls))] or [pd.DataFrame()], ignore_index=True)
    rows += [{"model": "wanda", "attack": "none", **baseline_summary(ctx, after)},
             {"model": "wanda", "attack": "trigger_search", **attack_summary(ctx, wanda_attack)}]
    if len(control):
        rows.append({"model": "wanda", "attack": "trigger_search (control: non-memorised images)",
                     **attack_summary(ctx, control)})
    table = pd.DataFrame(rows)
    tables.update(finding_dori=table, triggers=pd.concat(
        [orig_attack.assign(model="original"), nemo_attack.assign(model="nemo"),
         wanda_attack.assign(model="wanda")] + ([control.assign(model="wanda")] if len(control) else []),
        ignore_index=True))
    by = {f"{r['model']}/{r['attack']}": {"mr": r["mr"], "similarity": r["similarity"]} for r in rows}
    return tables, {"table": by, "trigger_budget": ts}


def locality(ctx: ProbeContext, s) -> tuple[dict, dict]:
    """Are a memorised image's triggers local? Per target: pairwise distances between its
    triggers, activation similarity between them vs between different memorised prompts, and
    the IoU of the NeMo and Wanda masks computed from different triggers."""
    from safetensors.torch import load_file

    ts = _trigger_settings(s.trigger)
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
        embs = load_file(str(ctx.run_dir / "triggers" / f"{key}.safetensors"))["triggers"]
        pid = int(ctx.targets.iloc[i].prompt_id)
        ok = table.groupby("restart")["similarity"].max().gt(ctx.threshold).to_numpy()
        use = embs[torch.as_tensor(ok)] if ok.sum() >= 2 else embs
        acts = _flat(nemo_lib.value_activations(ctx.pipe, use, layers))
        nemo_masks = [ctx.json_part(f"locality-nemo-{i}-{j}",
                                    lambda e=e, j=j: localise_one(ctx, setup, e, pid, s.nemo))["neurons"]
                      for j, e in enumerate(use)]
        wanda_masks = [wanda_masks_for(ctx, e[None], s.wanda, [pid]) for e in use]
        rows.append({"prompt_id": pid, "caption": ctx.targets.iloc[i].caption,
                     "triggers": len(embs), "replicating_triggers": int(ok.sum()),
                     "used_triggers": len(use),
                     "trigger_distance": _mean_pairwise(use.flatten(1).numpy(), _l2),
                     "distance_from_prompt": float((use - ctx.target_cond[i]).flatten(1).norm(dim=1).mean()),
                     "activation_cosine_triggers": _mean_pairwise(acts, _cosine),
                     "nemo_iou": _mean_pairwise(nemo_masks, _neuron_iou),
                     "wanda_iou": _mean_pairwise(wanda_masks, wanda_lib.mask_iou)})
    table = pd.DataFrame(rows)
    return {"locality": table}, {
        "between_prompts": {"embedding_distance": between_dist, "activation_cosine": between_acts},
        "median": {c: float(table[c].median()) for c in table.columns if c not in ("prompt_id", "caption")}}


def _flat(acts: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([acts[k] for k in acts], axis=1)


def _cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _l2(a, b) -> float:
    return float(np.linalg.norm(a - b))


def _neuron_iou(a: dict, b: dict) -> float:
    sa = {(k, i) for k, v in a.items() for i in v}
    sb = {(k, i) for k, v in b.items() for i in v}
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _mean_pairwise(items, fn) -> float:
    pairs = list(combinations(range(len(items)), 2))
    if not pairs:
        return float("nan")
    return float(np.mean([fn(items[i], items[j]) for i, j in pairs]))


def check_settings(name: str, s, prefix: str = "probe") -> None:
    """Config errors before anything runs (bad values name the field)."""
    def positive(node, at):
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
    for node, where in ((s, prefix), (s.get("wanda"), f"{prefix}.wanda"), (s.get("surrogate"), f"{prefix}.surrogate")):
        if node is not None and "fraction" in node and not 0 < float(node.fraction) <= 1:
            raise ConfigError(f"{where}.fraction must be in (0, 1] (got {node.fraction})")
