"""``diffmem embed``: images (a dataset or a generate run) -> descriptor vectors.

Writes an embed run (:class:`diffmem.features.store.FeatureStore`): the vectors in parts
of ``part_size`` rows (float32, L2-normalised), the ids table (one row per item, in order)
and ``info.json`` (the extractor's name, dim and preprocessing, the source, provenance).
Parts are written atomically, so a killed run resumes at the first missing part; shard
``i`` of ``n`` embeds parts ``i, i+n, ...`` so array jobs split the work.
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
from diffmem.data.samples import read_samples
from diffmem.errors import ConfigError, DataError
from diffmem.features import build_extractor
from diffmem.features.onnx import warn_flat_testbed
from diffmem.features.store import FeatureStore
from diffmem.runs import check_claim, check_inputs, claim, config_subset, finish, is_done

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
    """Items of a finished generate run (its samples table)."""
    return Path(samples_dir), read_samples(samples_dir).rename(columns={"sample_id": "item_id"})


def embed_files(extractor, root: Path, files: list[str], store: FeatureStore, *, part_size: int,
                batch_size: int, shard: int = 0, num_shards: int = 1, resolution: int | None = None) -> None:
    """Embed ``files`` into the parts of ``store``, skipping parts that exist."""
    n_parts = (len(files) + part_size - 1) // part_size
    todo = [p for p in range(shard, n_parts, num_shards) if not store.has_part(p)]
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
            store.write_part(p, np.concatenate(vecs))


def fingerprint(cfg: DictConfig) -> dict:
    return config_subset(cfg, ["features", "source", "split", "samples_dir", "part_size", "num_shards",
                               "resolution"] + (["data"] if cfg.source == "dataset" else []))


def run(cfg: DictConfig) -> Path:
    """Embed per ``cfg``; returns the run dir.

    Config, item list and extractor are checked before the run dir is claimed, so a
    refused run creates nothing. An image that cannot be read fails the run naming the
    file; the parts finished before it stay (a re-run resumes), and the ids table,
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
    device = configure_torch(cfg)
    extractor = build_extractor(cfg.features.extractor, device=str(device))
    warn_flat_testbed(extractor.name, cfg.data.get("kind"))
    run_dir = claim(cfg.run_dir, fingerprint(cfg))
    check_inputs(run_dir, "item list", items)
    files = items["file"].tolist()
    store = FeatureStore(run_dir)
    embed_files(extractor, root, files, store, part_size=cfg.part_size,
                batch_size=cfg.batch_size, shard=cfg.shard, num_shards=cfg.num_shards,
                resolution=cfg.resolution)
    n_parts = (len(files) + cfg.part_size - 1) // cfg.part_size
    if not all(store.has_part(p) for p in range(n_parts)):
        log.info("embed: shard %d/%d done; waiting for other shards", cfg.shard, cfg.num_shards)
        return run_dir
    store.write_ids(items)
    return finish(run_dir, cfg, {"n": len(items)}, extractor=extractor.info(), dim=extractor.dim,
                  feature=extractor.name, n=len(items), source=cfg.source)


main = hydra_app("embed", run)

if __name__ == "__main__":
    main()
