"""``diffmem generalise``: the memorisation -> generalisation transition (Kadkhodaie et al. 2024).

One job handles one training-set size ``n`` (``--multirun`` sweeps it): it trains, as the
train stage does (:func:`diffmem.training.train_model`), two unconditional models on two
disjoint ``n``-image subsets of one dataset (``data.subset`` parts 0 and 1; seeds ``seed``
and ``seed + 1``; same architecture, one shared frozen VAE), both sample from the same initial noises, and per noise we measure
(a) ``cross_sim``, the similarity of the two models' samples, and (b) ``nn_sim``, each
sample's similarity to the nearest training image of its own model's subset, both with the
``features`` descriptor. Small n: each model reproduces its own images (high nn_sim, low
cross_sim); large n: both learn the same score, so their samples agree (high cross_sim) and
are new images (lower nn_sim).

Unconditional: every caption is dropped in training (``caption_dropout`` 1, so the models
only ever see the empty prompt) and sampling uses the empty prompt with guidance 1.

``run_dir`` is the experiment folder shared by every n (also under ``--multirun``):
``n-<n>/{a,b}/train/`` (train stage run dirs), ``n-<n>/{a,b}/samples/*.png``,
``n-<n>/pairs.parquet`` (one row per noise), ``n-<n>/subsets.parquet``, ``n-<n>/pairs.png``,
``n-<n>/info.json`` + ``_SUCCESS``. Every job ends by rewriting, atomically, the summary of
every finished n: ``generalisation.parquet``, ``generalisation.png`` and ``summary.json``;
so after a sweep (in any order, or several sweeps in parallel) the last job leaves the
complete figure, and a finished n re-run only rewrites the summary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from diffmem import training
from diffmem.config import hydra_app
from diffmem.device import configure_torch
from diffmem.data import load_dataset, load_images, to_tensor
from diffmem.errors import ConfigError
from diffmem.features import build_extractor
from diffmem.features.base import sha256_file
from diffmem.data.samples import plan_samples
from diffmem.loading import load_model
from diffmem.metrics import top1_similarity
from diffmem.models import resolve_device
from diffmem.report.figures import GridPair, save_figure, image_grid
from diffmem.runner import Job, Outcome, StageSpec, fingerprint
from diffmem.runs import (check_claim, claim, is_done, provenance, read_json, read_parquet, write_json,
                          write_parquet)
from diffmem.sampling import decode, generate_images

log = logging.getLogger(__name__)
TABLE, FIGURE, SUMMARY = "generalisation.parquet", "generalisation.png", "summary.json"
MODELS = ("a", "b")
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def check_config(cfg: DictConfig) -> None:
    if not (Path(cfg.vae_path) / VAE_WEIGHTS).is_file():
        raise ConfigError(f"vae_path: no diffusers VAE ({VAE_WEIGHTS}) in {cfg.vae_path}")


def n_dir(run_dir, n: int) -> Path:
    return Path(run_dir) / f"n-{int(n):05d}"


def train_config(cfg: DictConfig, part: int) -> DictConfig:
    """The train stage's config of model ``MODELS[part]``: subset part ``part``, seed ``seed + part``."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    subset = {"kinds": plain["kinds"], "size": plain["n"], "part": part, "seed": plain["seed"]}
    return OmegaConf.create({
        "run_dir": str(n_dir(cfg.run_dir, cfg.n) / MODELS[part] / "train"),
        "seed": plain["seed"] + part, "device": plain["device"], "threads": plain["threads"],
        "resolution": plain["resolution"], "data": {**plain["data"], "subset": subset},
        "arch": plain["arch"], "vae": {"steps": 0, "path": plain["vae_path"]},
        "unet": {**plain["unet"], "caption_dropout": 1.0}, "save_dtype": "float32"})


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8: the extractors take it as is


def measure(cfg: DictConfig, out: Path, configs: list[DictConfig], parts: list) -> float:
    """Train both models, sample the same noises with both, write ``pairs``/``subsets`` tables;
    returns the VAE's reconstruction ceiling."""
    from diffmem import train

    ext = build_extractor(cfg.features.extractor)
    device = resolve_device(cfg.device)
    plan = plan_samples(pd.DataFrame({"prompt_id": [0], "caption": [""]}), int(cfg.samples),
                        int(cfg.seed))  # one seed per noise, the same for both models
    feats, nearest, subsets, ceiling = {}, {}, [], []
    for model, tcfg, (root, rows) in zip(MODELS, configs, parts):
        pipe = load_model(train.run(tcfg) / "model", device)
        generate_images(pipe, plan, out / model, resolution=cfg.resolution, steps=cfg.sample_steps,
                        guidance=1.0, batch_size=cfg.batch_size, desc=f"generate n={cfg.n} {model}")
        feats[model] = ext(_nchw(load_images(out / model, plan["file"])))
        real = load_images(root, rows["file"], cfg.resolution)
        real_feats = ext(_nchw(real))
        sims = (feats[model] @ real_feats.T).cpu().numpy()
        nearest[model] = (top1_similarity(sims), rows["image_id"].to_numpy()[sims.argmax(1)])
        subsets.append(rows.assign(model=model)[["model", "image_id", "file"]])
        with torch.no_grad():  # a copy can be no closer than the VAE's own reconstruction
            latents = training.encode_latents(pipe.vae, to_tensor(real))
            recon = torch.cat([decode(pipe, z) for z in latents.split(256)])
        ceiling.append((ext(recon) * real_feats).sum(1).cpu())
    fa, fb = feats["a"], feats["b"]
    pairs = plan[["sample_id", "seed"]].assign(
        n=int(cfg.n), cross_sim=(fa * fb).sum(1).cpu().numpy(),
        shuffled_sim=(fa * fb.roll(1, 0)).sum(1).cpu().numpy(),  # control: different noises
        nn_sim_a=nearest["a"][0], nn_id_a=nearest["a"][1],
        nn_sim_b=nearest["b"][0], nn_id_b=nearest["b"][1],
        file_a="a/" + plan["file"], file_b="b/" + plan["file"])
    write_parquet(out / "subsets.parquet", pd.concat(subsets, ignore_index=True))
    write_parquet(out / "pairs.parquet", pairs)
    image_grid([GridPair(out / p.file_a, out / p.file_b, f"{p.cross_sim:.2f}")
                for p in pairs.head(8).itertuples()], out / "pairs.png")
    return float(torch.cat(ceiling).mean())


def transition_n(n, cross, nn) -> float | None:
    """The memorisation -> generalisation transition: the first size at which the mean
    cross-model similarity reaches the mean nearest-training similarity.

    Linear interpolation of ``cross - nn`` in log n between the last size below and the
    first at or above; None when the measured sizes bracket no such crossing (including
    when cross >= nn already at the smallest n).
    """
    logn, d = np.log(np.asarray(n, float)), np.asarray(cross, float) - np.asarray(nn, float)
    for i in range(1, len(d)):
        if d[i - 1] < 0 <= d[i]:
            frac = -d[i - 1] / (d[i] - d[i - 1])
            return float(np.exp(logn[i - 1] + frac * (logn[i] - logn[i - 1])))
    return None


def _stats(name: str, values) -> dict:
    values = np.asarray(values, float)
    return {name: values.mean(), f"{name}_q25": np.percentile(values, 25),
            f"{name}_q75": np.percentile(values, 75)}


class HeldoutBaseline:
    """The novelty baseline: held-out real images' similarity to the nearest image of each
    model's subset (what "far from the training images" looks like), averaged over models.

    The dataset, the descriptor and the held-out features are loaded once for every n.
    """

    def __init__(self, cfg: DictConfig):
        self.root, manifest = load_dataset(OmegaConf.merge(cfg.data, {"subset": None}))
        self.resolution = cfg.resolution
        self.ext = build_extractor(cfg.features.extractor)
        held = manifest.loc[manifest["split"] == "heldout", "file"].unique() if "split" in manifest else []
        self.held = self._embed(held) if len(held) else None

    def _embed(self, files) -> torch.Tensor:
        return self.ext(_nchw(load_images(self.root, files, self.resolution)))

    def __call__(self, n_path: Path) -> float:
        if self.held is None:
            return float("nan")
        subsets = read_parquet(n_path / "subsets.parquet")
        return float(np.mean([top1_similarity((self.held @ self._embed(g["file"]).T).cpu().numpy()).mean()
                              for _, g in subsets.groupby("model")]))


def summary_table(cfg: DictConfig) -> pd.DataFrame:
    """One row per finished n: mean and quartiles of cross_sim and nn_sim (both models'
    samples), the different-noise control, the held-out baseline and the VAE ceiling."""
    heldout_nn_sim, rows = HeldoutBaseline(cfg), []
    for d in sorted(p for p in Path(cfg.run_dir).glob("n-*") if is_done(p)):
        pairs = read_parquet(d / "pairs.parquet")
        rows.append({"n": int(pairs.n.iloc[0]), "samples": len(pairs),
                     **_stats("cross_sim", pairs.cross_sim),
                     **_stats("nn_sim", np.concatenate([pairs.nn_sim_a, pairs.nn_sim_b])),
                     "shuffled_sim": pairs.shuffled_sim.mean(),
                     "heldout_nn_sim": heldout_nn_sim(d),
                     "vae_ceiling": read_json(d / "info.json")["vae_ceiling"]})
    return pd.DataFrame(rows).sort_values("n", ignore_index=True)


def plot(table: pd.DataFrame, n_star: float | None, path: Path, feature: str) -> Path:
    """Both similarities (mean, interquartile band) against n on a log axis; the transition marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for col, label, color in (("cross_sim", "model A vs model B, same noise", "#1f77b4"),
                              ("nn_sim", "sample vs nearest own training image", "#d62728")):
        ax.plot(table.n, table[col], "o-", color=color, label=label)
        ax.fill_between(table.n, table[f"{col}_q25"], table[f"{col}_q75"], color=color, alpha=0.15)
    ax.plot(table.n, table.shuffled_sim, ":", color="#7f7f7f", label="A vs B, different noises")
    ax.plot(table.n, table.heldout_nn_sim, ":", color="#d62728", label="held-out real image vs nearest (novel)")
    ax.plot(table.n, table.vae_ceiling, "--", color="#2ca02c", lw=1, label="VAE reconstruction (copy ceiling)")
    if n_star is not None:
        ax.axvline(n_star, color="k", lw=1, ls="--", label=f"transition n = {n_star:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(table.n, [str(n) for n in table.n])
    ax.set_xlabel("training images per model (n)")
    ax.set_ylabel(f"{feature} similarity")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, path)


def summarise(cfg: DictConfig) -> Path:
    """(Re)write the table, figure and ``summary.json`` from every finished n."""
    run_dir = Path(cfg.run_dir)
    table = summary_table(cfg)
    n_star = transition_n(table.n, table.cross_sim, table.nn_sim)
    write_parquet(run_dir / TABLE, table)
    plot(table, n_star, run_dir / FIGURE, cfg.features.extractor.name)
    write_json(run_dir / SUMMARY, {"transition_n": n_star, "n": table.n.tolist(),
                                   "definition": " ".join(transition_n.__doc__.split("\n\n")[0].split()),
                                   **provenance(cfg)})
    return run_dir


def prepare(cfg: DictConfig) -> tuple[list, list]:
    """Both subsets' train configs and data (the dataset made), checked before anything is
    written; the experiment's folder must hold this experiment (every setting but n)."""
    if not (Path(cfg.vae_path) / VAE_WEIGHTS).is_file():
        raise ConfigError(f"vae_path: no diffusers VAE ({VAE_WEIGHTS}) in {cfg.vae_path}")
    check_claim(cfg.run_dir, experiment_fingerprint(cfg))
    configs = [train_config(cfg, part) for part in range(len(MODELS))]
    return configs, [load_dataset(c.data) for c in configs]


def experiment_fingerprint(cfg: DictConfig) -> dict:
    """What every n of one experiment shares (n excluded); the VAE by content."""
    return fingerprint(cfg, ("n", "batch_size"), {"vae_sha256": sha256_file(Path(cfg.vae_path) / VAE_WEIGHTS)})


def body(job: Job) -> Outcome:
    """Measure size ``cfg.n`` in its own folder ``n-<n>`` of the experiment."""
    cfg = job.cfg
    configure_torch(cfg)
    claim(cfg.run_dir, experiment_fingerprint(cfg))
    vae_ceiling = measure(cfg, job.dir, *job.ctx)
    return Outcome({"n": int(cfg.n)}, {"vae_ceiling": vae_ceiling})


#: one run dir per n (a multirun over n fills one experiment); every job then rewrites the summary
SPEC = StageSpec("generalise", body, prepare, volatile=("batch_size",),
                 extra=lambda cfg, _: {"vae_sha256": sha256_file(Path(cfg.vae_path) / VAE_WEIGHTS)},
                 run_dir=lambda cfg: n_dir(cfg.run_dir, cfg.n))


def run(cfg: DictConfig) -> Path:
    """Measure size ``cfg.n`` (skipped when already done), then rewrite the summary; returns run_dir."""
    SPEC.run(cfg)
    return summarise(cfg)


main = hydra_app("generalise", run)

if __name__ == "__main__":
    main()
