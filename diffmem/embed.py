"""``diffmem embed``: images (a dataset or a generate run) -> descriptor vectors.

Writes an embed run (:class:`diffmem.features.store.FeatureStore`): the vectors in parts
of ``part_size`` items (float32, L2-normalised), the ids table (one row per vector, in
order), the items' captions and labels, the images skipped under ``data.on_error=skip``
and ``info.json`` (the extractor's name, dim and preprocessing, the source, the counts of
skipped images and of rows img2dataset marked failed, provenance). Images are decoded in
``num_workers`` DataLoader workers (ONNX descriptors: uint8 images, JPEGs at reduced size,
in threads beside the model; on a GPU: threads, the resize on the GPU) and batched by resized shape
(:mod:`diffmem.features.loader`). Parts are written atomically, so a killed run resumes at
the first missing part; shard ``i`` of ``n`` embeds parts ``i, i+n, ...`` so array jobs
split the work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffmem import distributed
from diffmem.checks import check_shard
from diffmem.config import hydra_app
from diffmem.data import load_dataset
from diffmem.data.datasets import MAX_PIXELS, on_error
from diffmem.data.img2dataset import NOT_SUCCESS
from diffmem.data.samples import read_samples
from diffmem.errors import ConfigError, DataError
from diffmem.features import build_stage_extractor
from diffmem.features.loader import embed_images
from diffmem.features.onnx import warn_flat_testbed
from diffmem.features.store import FeatureStore
from diffmem.runner import Job, Outcome, StageSpec, on_error_guard, require_items

if TYPE_CHECKING:
    from diffmem.features.base import Extractor

log = logging.getLogger(__name__)


def dataset_items(data_cfg: DictConfig, split: str | None = None) -> tuple[Path, pd.DataFrame]:
    """Items of a dataset: one row per distinct image file (duplicates share a vector);
    ``attrs[NOT_SUCCESS]`` counts the rows img2dataset marked failed."""
    root, manifest = load_dataset(data_cfg, captions=False)
    not_success = manifest.attrs.get(NOT_SUCCESS, 0)
    if split is not None:
        if "split" not in manifest:
            raise ConfigError(f"split={split}: the dataset has no 'split' column")
        manifest = manifest[manifest["split"] == split]
    items = manifest.drop_duplicates("file").rename(columns={"image_id": "item_id"})
    if items.empty:
        raise DataError(f"{root}: no images to embed (split={split})")
    items = items.reset_index(drop=True)
    items.attrs[NOT_SUCCESS] = not_success
    return root, items


def samples_items(samples_dir: str | Path) -> tuple[Path, pd.DataFrame]:
    """Items of a finished generate run (its samples table)."""
    return Path(samples_dir), read_samples(samples_dir).rename(columns={"sample_id": "item_id"})


def embed_files(
    extractor: Extractor,
    root: Path,
    items: pd.DataFrame,
    store: FeatureStore,
    *,
    part_size: int,
    batch_size: int,
    shard: int = 0,
    num_shards: int = 1,
    resolution: int | None = None,
    num_workers: int = 0,
    skip_errors: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> None:
    """Embed the images of ``items`` into the parts of ``store``, skipping parts that exist
    (images over ``max_pixels`` are refused before they are decoded; a damaged part is recomputed)."""
    if num_workers == 0 and extractor.needs_torch and str(extractor.device).startswith("cuda"):
        log.warning(
            "embed: num_workers=0 decodes in the main thread, which cannot keep a GPU busy; "
            "set num_workers to the free CPU cores"
        )
    files = items["file"].tolist()
    n_parts = (len(files) + part_size - 1) // part_size
    todo = [
        p
        for p in range(shard, n_parts, num_shards)
        if not store.has_part(p, len(files[p * part_size : (p + 1) * part_size]), extractor.dim)
    ]
    total = sum(len(files[p * part_size : (p + 1) * part_size]) for p in todo)
    # closed on errors too: the bar's last line must not follow the CLI's error line
    with tqdm(total=total, desc=f"embed[{extractor.name}]", mininterval=2) as bar:
        for p, vectors, skipped in embed_images(
            extractor,
            root,
            files,
            todo,
            part_size,
            batch_size=batch_size,
            num_workers=num_workers,
            resolution=resolution,
            skip_errors=skip_errors,
            max_pixels=max_pixels,
            progress=bar.update,
        ):
            for row in skipped.itertuples():
                log.warning("embed: skipped %s", row.error)
            skipped.insert(0, "item_id", items["item_id"].to_numpy()[skipped.pop("index").to_numpy(int)])
            store.write_part(p, vectors, skipped)


def prepare(cfg: DictConfig) -> tuple[Path, pd.DataFrame]:
    """The items to embed (checked before anything is written)."""
    check_shard(cfg.shard, cfg.num_shards)
    if cfg.source == "dataset":
        return dataset_items(cfg.data, cfg.split)
    if cfg.source == "samples":
        if not cfg.samples_dir:
            raise ConfigError("source=samples needs samples_dir=<a generate run dir>")
        return samples_items(cfg.samples_dir)
    raise ConfigError(f"source '{cfg.source}' is not one of dataset, samples")


def body(job: Job) -> Outcome:
    """Embed every missing part. An image that cannot be read fails the run naming the file
    (``data.on_error=skip``: it is left out, listed in ``skipped.parquet`` and counted); the
    parts finished before it stay (a re-run resumes), and the ids table appears only once
    every part exists (the last shard to finish publishes)."""
    cfg, (root, items) = job.cfg, job.ctx
    skip_errors = cfg.source == "dataset" and on_error(cfg.data) == "skip"
    extractor = build_stage_extractor(cfg)  # an ONNX descriptor's run never imports torch
    warn_flat_testbed(extractor.name, cfg.data.get("kind"))
    ranks = distributed.ranks()  # each rank of a data-parallel job embeds its share of the parts
    store = FeatureStore(job.dir)
    embed_files(
        extractor,
        root,
        items,
        store,
        part_size=cfg.part_size,
        batch_size=cfg.batch_size,
        shard=cfg.shard + cfg.num_shards * ranks.rank,
        num_shards=cfg.num_shards * ranks.world_size,
        resolution=cfg.resolution,
        num_workers=int(cfg.get("num_workers", 0)),
        skip_errors=skip_errors,
        max_pixels=cfg.data.get("max_pixels", MAX_PIXELS),
    )
    distributed.barrier("embed: parts written")
    if ranks.rank != 0:  # rank 0 publishes
        return Outcome(complete=False)
    n_parts = (len(items) + cfg.part_size - 1) // cfg.part_size
    if not all(store.has_part(p) for p in range(n_parts)):
        log.info("embed: shard %d/%d done; waiting for other shards", cfg.shard, cfg.num_shards)
        return Outcome(complete=False)
    n_skipped = store.write_ids(items)
    require_items(len(items) - n_skipped, "images", f"embed {job.dir}")
    counts = {
        "n": len(items) - n_skipped,
        "n_skipped": n_skipped,
        "n_not_success": int(items.attrs.get(NOT_SUCCESS, 0)),
    }
    if n_skipped:
        log.warning(
            "embed: %d of %d images skipped (unreadable; listed in %s)", n_skipped, len(items), store.skipped_path
        )

    def rank_items(r: int, w: int) -> int:  # the items of the parts rank r of w embedded
        return sum(
            min(cfg.part_size, len(items) - p * cfg.part_size)
            for p in range(cfg.shard + cfg.num_shards * r, n_parts, cfg.num_shards * w)
        )

    return Outcome(
        counts,
        dict(
            extractor=extractor.info(),
            dim=extractor.dim,
            feature=extractor.name,
            source=cfg.source,
            **counts,
            data_parallel=distributed.summary(rank_items),
        ),
    )


def item_list(cfg: DictConfig, ctx: Any) -> dict:
    """A resume whose item list changed is refused: its ids and files (what the parts' rows are);
    captions and labels are not what a vector depends on."""
    return {"item list": ctx[1][["item_id", "file"]]}


def skipped_guard(cfg: DictConfig, summary: dict) -> str | None:
    return on_error_guard(on_error(cfg.data) if cfg.source == "dataset" else "fail", summary.get("n_skipped", 0))


#: ``batch_size`` does not change the vectors (tests/test_embed.py)
SPEC = StageSpec(
    "embed", body, prepare, volatile=("batch_size",), inputs=item_list, guard=skipped_guard, data_parallel=True
)
run = SPEC.run
main = hydra_app("embed", run)

if __name__ == "__main__":
    main()
