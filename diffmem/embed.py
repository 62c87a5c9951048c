"""``diffmem embed``: images (a dataset or a generate run) -> descriptor vectors.

Writes ``ids.parquet`` (one row per item, in order), ``features/part-XXXXX.npy``
(float32 [n, D], L2-normalised, ``part_size`` rows each) and ``info.json`` (the
extractor's name, dim and preprocessing, the source, provenance). Parts are written
atomically, so a killed run resumes at the first missing part; shard ``i`` of ``n``
embeds parts ``i, i+n, ...`` so array jobs split the work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from diffmem.config import hydra_app
from diffmem.data import load_dataset, load_image
from diffmem.errors import ConfigError, DataError
from diffmem.features import build_extractor
from diffmem.runs import atomic_path, claim, config_subset, finish, is_done, read_json, write_parquet

log = logging.getLogger(__name__)


def dataset_items(data_cfg, split: str | None = None) -> tuple[Path, pd.DataFrame]:
    """Items of a dataset: one row per distinct image file (duplicates share a vector)."""
    root, manifest = load_dataset(data_cfg)
    if split is not None:
        if "split" not in manifest:
            raise ConfigError(f"split={split}: the dataset has no 'split' column")
        manifest = manifest[manifest["split"] == split]
    items = manifest.drop_duplicates("file").rename(columns={"image_id": "item_id"})
    if items.empty:
        raise DataError(f"{root}: no images to embed (split={split})")
    return root, items.reset_index(drop=True)


def samples_items(samples_dir: str | Path) -> tuple[Path, pd.DataFrame]:
    """Items of a finished generate run (its ``samples.parquet``)."""
    samples_dir = Path(samples_dir)
    table = samples_dir / "samples.parquet"
    if not table.exists():
        raise DataError(f"{table}: not found (is {samples_dir} a finished generate run?)")
    items = pd.read_parquet(table).rename(columns={"sample_id": "item_id"})
    if items.empty:
        raise DataError(f"{table}: no samples")
    return samples_dir, items


def embed_files(extractor, root: Path, files: list[str], out_dir: Path, *, part_size: int,
                batch_size: int, shard: int = 0, num_shards: int = 1, resolution: int | None = None) -> None:
    """Embed ``files`` into ``out_dir/part-XXXXX.npy``, skipping parts that exist."""
    n_parts = (len(files) + part_size - 1) // part_size
    todo = [p for p in range(shard, n_parts, num_shards) if not (out_dir / f"part-{p:05d}.npy").exists()]
    bar = tqdm(total=sum(len(files[p * part_size:(p + 1) * part_size]) for p in todo),
               desc=f"embed[{extractor.name}]", mininterval=2)
    for p in todo:
        chunk = files[p * part_size:(p + 1) * part_size]
        vecs = []
        for i in range(0, len(chunk), batch_size):
            images = [Image.fromarray(load_image(root / f, resolution)) for f in chunk[i:i + batch_size]]
            vecs.append(extractor.embed_pil(images, batch_size=batch_size).cpu().numpy())
            bar.update(len(images))
        with atomic_path(out_dir / f"part-{p:05d}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.concatenate(vecs).astype(np.float32))
    bar.close()


def feature_parts(run_dir: str | Path) -> list[Path]:
    """The ``features/part-*.npy`` files of an embed run, in order."""
    parts = sorted((Path(run_dir) / "features").glob("part-*.npy"))
    if not parts:
        raise DataError(f"{run_dir}: no feature parts (features/part-*.npy)")
    return parts


def load_features(run_dir: str | Path) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """``(vectors [N, D], ids table, info)`` of a finished embed run."""
    run_dir = Path(run_dir)
    if not (run_dir / "_SUCCESS").exists():
        raise DataError(f"{run_dir}: not a finished embed run (no _SUCCESS)")
    info = read_json(run_dir / "info.json")
    x = np.concatenate([np.load(p) for p in feature_parts(run_dir)])
    ids = pd.read_parquet(run_dir / "ids.parquet")
    if len(ids) != len(x):
        raise DataError(f"{run_dir}: {len(ids)} ids but {len(x)} vectors")
    return x, ids, info


def fingerprint(cfg: DictConfig) -> dict:
    return config_subset(cfg, ["features", "source", "split", "samples_dir", "part_size", "num_shards",
                               "resolution"] + (["data"] if cfg.source == "dataset" else []))


def run(cfg: DictConfig) -> Path:
    """Embed per ``cfg``; returns the run dir."""
    for key in ("batch_size", "part_size", "num_shards"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key} must be >= 1 (got {cfg[key]})")
    if not 0 <= cfg.shard < cfg.num_shards:
        raise ConfigError(f"shard must be in [0, num_shards) (got {cfg.shard} of {cfg.num_shards})")
    if cfg.source == "dataset":
        root, items = dataset_items(cfg.data, cfg.split)
    elif cfg.source == "samples":
        if not cfg.samples_dir:
            raise ConfigError("source=samples needs samples_dir=<a generate run dir>")
        root, items = samples_items(cfg.samples_dir)
    else:
        raise ConfigError(f"source '{cfg.source}' is not one of dataset, samples")
    run_dir = claim(cfg.run_dir, fingerprint(cfg))
    if is_done(run_dir):
        return run_dir
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    extractor = build_extractor(cfg.features.extractor)
    write_parquet(run_dir / "ids.parquet", items)
    files = items["file"].tolist()
    embed_files(extractor, root, files, run_dir / "features", part_size=cfg.part_size,
                batch_size=cfg.batch_size, shard=cfg.shard, num_shards=cfg.num_shards,
                resolution=cfg.resolution)
    n_parts = (len(files) + cfg.part_size - 1) // cfg.part_size
    if any(not (run_dir / "features" / f"part-{p:05d}.npy").exists() for p in range(n_parts)):
        log.info("embed: shard %d/%d done; waiting for other shards", cfg.shard, cfg.num_shards)
        return run_dir
    return finish(run_dir, cfg, {"n": len(items)}, extractor=extractor.info(), dim=extractor.dim,
                  feature=extractor.name, n=len(items), source=cfg.source)


main = hydra_app("embed", run)

if __name__ == "__main__":
    main()
