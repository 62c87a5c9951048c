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
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from diffmem.checks import check_positive, check_shard
from diffmem.config import hydra_app
from diffmem.device import configure_torch
from diffmem.data import load_dataset, load_image
from diffmem.errors import ConfigError, DataError
from diffmem.features import build_extractor
from diffmem.runs import (atomic_path, check_claim, check_inputs, claim, config_subset, finish,
                          is_done, read_json, read_parquet, write_parquet)

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
    items = read_parquet(table).rename(columns={"sample_id": "item_id"})
    missing = [c for c in ("item_id", "file") if c not in items]
    if missing:
        raise DataError(f"{table}: no {' or '.join(missing)} column (is {samples_dir} a generate run?)")
    if items.empty:
        raise DataError(f"{table}: no samples")
    return samples_dir, items


def embed_files(extractor, root: Path, files: list[str], out_dir: Path, *, part_size: int,
                batch_size: int, shard: int = 0, num_shards: int = 1, resolution: int | None = None) -> None:
    """Embed ``files`` into ``out_dir/part-XXXXX.npy``, skipping parts that exist."""
    n_parts = (len(files) + part_size - 1) // part_size
    todo = [p for p in range(shard, n_parts, num_shards) if not (out_dir / f"part-{p:05d}.npy").exists()]
    total = sum(len(files[p * part_size:(p + 1) * part_size]) for p in todo)
    # closed on errors too: the bar's last line must not follow the CLI's error line
    with tqdm(total=total, desc=f"embed[{extractor.name}]", mininterval=2) as bar:
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


def feature_parts(run_dir: str | Path) -> list[Path]:
    """The ``features/part-*.npy`` files of an embed run, in order."""
    parts = sorted((Path(run_dir) / "features").glob("part-*.npy"))
    if not parts:
        raise DataError(f"{run_dir}: no feature parts (features/part-*.npy)")
    return parts


def _load_part(path: Path, dim: int | None) -> np.ndarray:
    """One feature part, checked: a finite float [n, D] array (errors name the file and row)."""
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable .npy array ({first})") from err
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: expected a float array [n, D], got {x.dtype} of shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise DataError(f"{path}: vectors have D={x.shape[1]}, expected D={dim}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        more = f" (and {int(bad.sum()) - 1} more rows)" if bad.sum() > 1 else ""
        raise DataError(f"{path}: row {int(bad.argmax())}{more} contains NaN or infinite values")
    return x


def load_features(run_dir: str | Path) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """``(vectors [N, D], ids table, info)`` of a finished embed run."""
    run_dir = Path(run_dir)
    if not (run_dir / "_SUCCESS").exists():
        raise DataError(f"{run_dir}: not a finished embed run (no _SUCCESS)")
    for name in ("info.json", "ids.parquet"):
        if not (run_dir / name).is_file():
            raise DataError(f"{run_dir}: not an embed run ({name} missing)")
    try:
        info = read_json(run_dir / "info.json")
    except ValueError as err:
        raise DataError(f"{run_dir / 'info.json'}: not valid JSON ({err})") from err
    if not isinstance(info, dict) or "feature" not in info:
        raise DataError(f"{run_dir / 'info.json'}: no 'feature' field (is {run_dir} an embed run?)")
    dim = int(info["dim"]) if info.get("dim") is not None else None
    parts = [_load_part(p, dim) for p in feature_parts(run_dir)]
    if dim is None and len({p.shape[1] for p in parts}) > 1:
        raise DataError(f"{run_dir}: feature parts have different dimensions "
                        f"({', '.join(str(p.shape[1]) for p in parts)})")
    x = np.concatenate(parts).astype(np.float32, copy=False)
    ids = read_parquet(run_dir / "ids.parquet")
    if len(ids) != len(x):
        raise DataError(f"{run_dir}: {len(ids)} ids but {len(x)} vectors")
    return x, ids, info


def fingerprint(cfg: DictConfig) -> dict:
    return config_subset(cfg, ["features", "source", "split", "samples_dir", "part_size", "num_shards",
                               "resolution"] + (["data"] if cfg.source == "dataset" else []))


def run(cfg: DictConfig) -> Path:
    """Embed per ``cfg``; returns the run dir.

    Config, item list and extractor are checked before the run dir is claimed, so a
    refused run creates nothing. An image that cannot be read fails the run naming the
    file; the parts finished before it stay (a re-run resumes), and ``ids.parquet``,
    ``info.json`` and ``_SUCCESS`` appear only once every part exists.
    """
    for key in ("batch_size", "part_size"):
        check_positive(cfg[key], key)
    check_shard(cfg.shard, cfg.num_shards)
    check_positive(cfg.resolution, "resolution", optional=True)
    if check_claim(cfg.run_dir, fingerprint(cfg)) and is_done(cfg.run_dir):
        return Path(cfg.run_dir)
    if cfg.source == "dataset":
        root, items = dataset_items(cfg.data, cfg.split)
    elif cfg.source == "samples":
        if not cfg.samples_dir:
            raise ConfigError("source=samples needs samples_dir=<a generate run dir>")
        root, items = samples_items(cfg.samples_dir)
    else:
        raise ConfigError(f"source '{cfg.source}' is not one of dataset, samples")
    configure_torch(cfg)
    extractor = build_extractor(cfg.features.extractor)
    run_dir = claim(cfg.run_dir, fingerprint(cfg))
    check_inputs(run_dir, "item list", items)
    files = items["file"].tolist()
    embed_files(extractor, root, files, run_dir / "features", part_size=cfg.part_size,
                batch_size=cfg.batch_size, shard=cfg.shard, num_shards=cfg.num_shards,
                resolution=cfg.resolution)
    n_parts = (len(files) + cfg.part_size - 1) // cfg.part_size
    if any(not (run_dir / "features" / f"part-{p:05d}.npy").exists() for p in range(n_parts)):
        log.info("embed: shard %d/%d done; waiting for other shards", cfg.shard, cfg.num_shards)
        return run_dir
    write_parquet(run_dir / "ids.parquet", items)
    return finish(run_dir, cfg, {"n": len(items)}, extractor=extractor.info(), dim=extractor.dim,
                  feature=extractor.name, n=len(items), source=cfg.source)


main = hydra_app("embed", run)

if __name__ == "__main__":
    main()
