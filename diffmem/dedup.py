"""``diffmem dedup``: near-duplicate groups within a training set, and the set without them.

Embeds a dataset through the embed stage (in ``<run_dir>/embed``, resumable as every embed
run), or reads an existing embed run (``embed_dir``: its recorded ``data`` is reloaded for
the rows, files and captions), then groups its images (:mod:`diffmem.index.dedup`: FAISS range
search, connected components above ``threshold``, optional exact pixel hashes of the images
that could be pixel-identical to another, kept in ``hashes.parquet``). Writes
``groups.parquet`` (one row per dataset row: ``group_id``, ``group_size``, ``item_id``,
``file``, ``score`` = cosine to the group's representative, ``is_representative``, ``exact``),
``dedup_manifest.parquet`` (the representative row of every group, with the dataset's
columns and ``dedup_group``, ``dedup_group_size``: what ``data=folder data.root=<the data
root> data.manifest=<it>`` reads) and
``report.html`` (the largest groups, each member beside its representative). Rows of one
file (a dataset listing an image many times) always share a group. The threshold, the data
and the images' headers are checked before anything is embedded or written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from diffmem import embed
from diffmem.config import hydra_app
from diffmem.data import load_dataset
from diffmem.data.datasets import MAX_PIXELS, on_error
from diffmem.errors import ConfigError, DataError
from diffmem.features import check_extractor
from diffmem.features.store import FeatureStore
from diffmem.index import set_threads
from diffmem.index.dedup import check_images, check_threshold, group_vectors, groups_by_row, pixel_hashes
from diffmem.report.html import write_dedup_report
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.runs import provenance, read_parquet, resumed, write_parquet

log = logging.getLogger(__name__)


def _embed_cfg(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The embed stage's config (``cfg.embed``) writing into ``run_dir``."""
    return cast(
        DictConfig,
        OmegaConf.merge(
            OmegaConf.to_container(cfg.embed, resolve=True), {"run_dir": str(run_dir), "source": "dataset"}
        ),
    )


def _rows(cfg: DictConfig) -> tuple[Path, pd.DataFrame, DictConfig]:
    """``(root, dataset rows, data config)`` of the images to group: ``cfg.data`` (split
    ``split``), or the data an existing embed run recorded."""
    if not cfg.embed_dir:
        data, split = cfg.data, cfg.split
    else:
        info = FeatureStore(cfg.embed_dir).info()  # a finished embed run, with its resolved config
        if info.get("source") != "dataset":
            raise ConfigError(
                f"embed_dir={cfg.embed_dir}: an embed run of source=samples; dedup groups a "
                "dataset's images (embed it with source=dataset)"
            )
        data, split = OmegaConf.create(info["config"]["data"]), info["config"].get("split")
    root, rows = load_dataset(data, captions=False)
    if split is not None:
        if "split" not in rows:
            raise ConfigError(f"split={split}: the dataset has no 'split' column")
        rows = rows[rows["split"] == split]
    if rows.empty:
        raise DataError(f"{root}: no images to group (split={split})")
    return root, rows.reset_index(drop=True), data


def prepare(cfg: DictConfig) -> tuple[Path, pd.DataFrame, DictConfig]:
    """The rows to group, after checking the threshold, the data and (under
    ``data.on_error=fail``) every image's header: nothing is embedded or written before."""
    check_threshold(cfg.threshold)
    root, rows, data = _rows(cfg)
    if not cfg.embed_dir:
        check_extractor(cfg.embed.features.extractor)
        if on_error(data) == "fail":
            check_images(root, rows["file"].drop_duplicates())
    return root, rows, data


def _pixel_digests(path: Path, root: Path, files: np.ndarray, max_pixels: int) -> Callable[[np.ndarray], list]:
    """Rows -> :func:`pixel_hashes` of their ``files``, kept in ``path`` (``file``, ``hash``) so a
    resumed run does not decode them again."""

    def digests(rows: np.ndarray) -> list:
        names = files[rows].tolist()

        def read(p: Path) -> list:
            stored = read_parquet(p).set_index("file")["hash"]
            return [stored[f] for f in names]  # a table of other files: a KeyError, so recomputed

        def make() -> None:
            table = pd.DataFrame({"file": names, "hash": pixel_hashes(root, names, max_pixels)}, dtype=object)
            write_parquet(path, table)

        return resumed(path, read, make)

    return digests


def body(job: Job) -> Outcome:
    cfg, run_dir, (root, rows, data) = job.cfg, job.dir, job.ctx
    embed_dir = Path(cfg.embed_dir) if cfg.embed_dir else embed.run(_embed_cfg(cfg, run_dir / "embed"))
    store = FeatureStore(embed_dir)
    x, items, info = store.load()
    set_threads(cfg.get("threads"))
    ix = cfg.index
    digests = None
    if cfg.exact_hash:
        files = items["file"].to_numpy()
        digests = _pixel_digests(run_dir / "hashes.parquet", root, files, data.get("max_pixels", MAX_PIXELS))
    grouped = group_vectors(
        x,
        cfg.threshold,
        digests,
        representative=cfg.representative,
        factory=ix.factory,
        nprobe=ix.nprobe,
        train_sample=ix.train_sample,
        seed=cfg.seed,
    )
    groups = groups_by_row(rows, items, grouped)
    write_parquet(run_dir / "groups.parquet", groups.drop(columns="rep_file"))
    reps = groups.loc[groups["is_representative"], ["item_id", "group_id", "group_size"]]
    reps = reps.rename(columns={"item_id": "image_id", "group_id": "dedup_group", "group_size": "dedup_group_size"})
    kept = rows.merge(reps, on="image_id").sort_values("dedup_group")
    manifest_path = write_parquet(run_dir / "dedup_manifest.parquet", kept.reset_index(drop=True))
    summary = {
        "rows": len(groups),
        "images": len(items),
        "groups": int(groups["group_id"].nunique()),
        "rows_removed": len(groups) - len(kept),
        "largest_group": int(groups["group_size"].max()),
        "rows_in_groups": int((groups["group_size"] > 1).sum()),
    }
    use = f"data=folder data.root={root.resolve()} data.manifest={manifest_path.resolve()}"
    # a folder read without a manifest: a file list to caption first
    if "caption" not in kept or kept["caption"].isna().all():
        use += " once it has a caption column"
    write_dedup_report(
        run_dir,
        groups.assign(
            file_abs=[str(root / f) for f in groups["file"]], rep_abs=[str(root / f) for f in groups["rep_file"]]
        ),
        {**summary, "threshold": float(cfg.threshold), "feature": info["feature"], "provenance": provenance(cfg)},
        top_n=int(cfg.report.top_groups),
        per_group=int(cfg.report.per_group),
    )
    log.info(
        "dedup: %d rows in %d groups (%d removed); train on it with %s",
        summary["rows"],
        summary["groups"],
        summary["rows_removed"],
        use,
    )
    return Outcome(
        summary, dict(feature=info["feature"], embed_dir=str(embed_dir), data_root=str(root), use=use, **summary)
    )


#: an existing embed run counts by content (one re-embedded under the same path is another input)
SPEC = StageSpec(
    "dedup",
    body,
    prepare,
    inputs=lambda cfg, ctx: {"item list": ctx[1][["image_id", "file"]]},
    extra=lambda cfg, _: ({"embed_digest": FeatureStore(cfg.embed_dir).content_digest()} if cfg.embed_dir else {}),
)
run = SPEC.run
main = hydra_app("dedup", run)

if __name__ == "__main__":
    main()
