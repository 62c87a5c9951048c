"""``diffmem index``: a FAISS index over an embed run's vectors.

``mode=single`` builds in one process. For large sets (FAISS's "indexes that do not
fit in RAM" recipe): ``mode=train`` trains one empty index on a sample, ``mode=add
shard=i num_shards=n`` adds every n-th feature part in its own job (a ``--multirun`` over
``shard``: every job works in ``build_dir``, not its Hydra job dir), ``mode=merge``
combines the shard files (``ondisk=true``: into an on-disk inverted-list file, for IVF
indexes larger than RAM). Both builds train on the same rows, so they return the same
neighbours. Approximate indexes get recall@1/@k measured against exact
search on held-out queries (database vectors perturbed with Gaussian noise, so they are
not in the index) written into the index's info (:func:`~diffmem.index.files.save_index`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from diffmem.checks import check_shard
from diffmem.config import hydra_app
from diffmem.errors import ConfigError, DataError
from diffmem.features.store import FeatureStore
from diffmem.index import (
    add_shard,
    build_index,
    measure_recall,
    merge_shards,
    save_index,
    set_search_params,
    set_threads,
    train_empty_index,
    training_rows,
    write_index,
)
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.runs import provenance, require

log = logging.getLogger(__name__)
MODES = ("single", "train", "add", "merge")


def held_out_queries(x: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """``n`` database vectors plus isotropic noise of norm ~``noise``, re-normalised."""
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), size=min(n, len(x)), replace=False)]
    q = q + rng.standard_normal(q.shape).astype(np.float32) * noise / np.sqrt(q.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _part_maps(features_dir: str) -> tuple[list[np.ndarray], np.ndarray]:
    """The embed run's feature parts memory-mapped, and their row offsets in the concatenation."""
    maps, _ = FeatureStore(features_dir).part_maps()
    return maps, np.cumsum([0] + [len(m) for m in maps])


def _sample(features_dir: str, train_sample: int | None, seed: int) -> np.ndarray:
    """The training rows (:func:`training_rows`) gathered from memory-mapped feature parts."""
    maps, offsets = _part_maps(features_dir)
    rows = training_rows(int(offsets[-1]), train_sample, seed)
    if rows is None:
        return np.concatenate([np.asarray(m) for m in maps])
    return np.concatenate(
        [np.asarray(m[rows[(rows >= lo) & (rows < hi)] - lo]) for m, lo, hi in zip(maps, offsets[:-1], offsets[1:])]
    )


def _info(cfg: DictConfig, finfo: dict, features_digest: str) -> dict:
    warning = FeatureStore(cfg.features_dir).warning()  # a random CLIP: the index says so too
    return {
        "factory": cfg.index.factory,
        "feature": finfo["feature"],
        "features_dir": str(Path(cfg.features_dir).resolve()),
        "features_digest": features_digest,
        **({"warning": warning} if warning else {}),
    }


def prepare(cfg: DictConfig) -> str:
    """The embed run's content digest (read once: the fingerprint and the index's info both carry it)."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode '{cfg.mode}' is not one of {', '.join(MODES)}")
    require(cfg, "features_dir", hint="features_dir=<an embed run dir>")
    check_shard(cfg.shard, cfg.num_shards)
    set_threads(cfg.get("threads"))
    return FeatureStore(cfg.features_dir).content_digest()


def body(job: Job) -> Outcome:
    """Build (a part of) the index: ``mode=train`` and ``add`` leave their part in ``build_dir``
    for ``merge`` to publish."""
    cfg, build_dir, ix = job.cfg, job.dir, job.cfg.index
    name = str(cfg.features_dir)
    if cfg.mode == "add":
        maps, offsets = _part_maps(cfg.features_dir)
        if cfg.shard >= len(maps):
            raise ConfigError(
                f"shard {cfg.shard}: the features have {len(maps)} parts, fewer than "
                f"num_shards={cfg.num_shards} (use num_shards <= {len(maps)})"
            )
        empty = build_dir / "empty.faiss"
        if not empty.is_file():
            raise DataError(f"{empty}: not found; run mode=train with the same name=... first")
        out = build_dir / "shards" / f"shard-{cfg.shard:04d}-of-{cfg.num_shards:04d}.faiss"
        if not out.exists():
            mine = range(cfg.shard, len(maps), cfg.num_shards)
            x = np.concatenate([np.asarray(maps[p]) for p in mine])
            ids = np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in mine])
            add_shard(empty, x, ids, out_path=out)
        return Outcome(complete=False)
    if cfg.mode == "merge":
        finfo = FeatureStore(cfg.features_dir).info()
        shards = sorted((build_dir / "shards").glob(f"shard-*-of-{cfg.num_shards:04d}.faiss"))
        if len(shards) != cfg.num_shards:
            built = sorted({int(p.stem.rsplit("-", 1)[-1]) for p in (build_dir / "shards").glob("shard-*-of-*.faiss")})
            hint = (
                f"; the shards there were built with num_shards={', '.join(map(str, built))}: pass the "
                "same num_shards as mode=add"
                if built and built != [cfg.num_shards]
                else "; run mode=add for every shard first (same name and num_shards)"
            )
            raise ConfigError(f"{build_dir}/shards: {len(shards)} of {cfg.num_shards} shards present{hint}")
        ondisk = build_dir / "index.ivfdata" if cfg.ondisk else None
        index = merge_shards(shards, build_dir / "empty.faiss" if ondisk else None, ondisk)
        set_search_params(index, ix.nprobe, ix.ef_search)
        save_index(index, build_dir, {**_info(cfg, finfo, job.ctx), **provenance(cfg)})
        return Outcome({"ntotal": index.ntotal})
    if cfg.mode == "train":  # reads only the sampled rows (memory-mapped parts)
        trained = train_empty_index(
            _sample(cfg.features_dir, ix.train_sample, cfg.seed), ix.factory, ix.metric, seed=cfg.seed, name=name
        )
        write_index(trained, build_dir / "empty.faiss")
        return Outcome(complete=False)
    x, _, finfo = FeatureStore(cfg.features_dir).load()
    index = build_index(
        x,
        ix.factory,
        ix.metric,
        train_sample=ix.train_sample,
        seed=cfg.seed,
        nprobe=ix.nprobe,
        hnsw_ef_search=ix.ef_search,
        name=name,
    )
    info = _info(cfg, finfo, job.ctx)
    if ix.factory.strip().lower() != "flat" and cfg.recall.queries:
        q = held_out_queries(x, cfg.recall.queries, cfg.recall.noise, cfg.seed)
        info["recall"] = measure_recall(index, x, q, k=cfg.recall.k)
    save_index(index, build_dir, {**info, **provenance(cfg)})
    return Outcome({"ntotal": index.ntotal})


#: the sharded modes share one folder whatever Hydra job runs them (a multirun of adds); the
#: embed run counts by content too: one re-embedded under the same path needs a new index
SPEC = StageSpec(
    "index",
    body,
    prepare,
    volatile=("mode", "num_shards", "build_dir", "ondisk"),
    extra=lambda cfg, digest: {"features_digest": digest},
    run_dir=lambda cfg: cfg.run_dir if cfg.mode == "single" else cfg.build_dir,
)
run = SPEC.run
main = hydra_app("index", run)

if __name__ == "__main__":
    main()
