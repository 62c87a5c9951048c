"""img2dataset output read as a manifest.

``data=img2dataset``: img2dataset's ``output_format=files`` folder — one parquet per shard
(``00000.parquet``: ``key``, ``status``, ``url``, ``caption``, ``width``, ...) next to the
shard's folder of images (``00000/<key>.jpg``). Rows whose ``status`` is not ``success``
(failed downloads: no image was written) are dropped and counted in the manifest's
``attrs["rows_not_success"]``; the embed stage records the count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from diffmem.data.datasets import check_image_files
from diffmem.data.inputs import check_captions
from diffmem.errors import DataError
from diffmem.runs import read_parquet

log = logging.getLogger(__name__)

#: the manifest attribute counting rows left out because their download failed
NOT_SUCCESS = "rows_not_success"


def load_img2dataset(
    root: str | Path, encode_format: str = "jpg", allow_outside_root: bool = False, check_files: bool = True
) -> pd.DataFrame:
    """The manifest of an img2dataset output folder: ``image_id`` (the key), ``file``
    (``<shard>/<key>.<encode_format>``), ``caption`` and img2dataset's other columns.

    As for a folder manifest, a key must be set, its caption a non-blank string, and its
    image a regular file inside ``root`` (unless ``allow_outside_root``; ``check_files``
    false lets a missing one through to ``data.on_error=skip``), all before any work starts."""
    root = Path(root)
    tables = sorted(p for p in root.glob("*.parquet") if p.is_file())
    if not tables:
        raise DataError(
            f"{root}: no img2dataset shard tables (*.parquet); is data.root img2dataset's "
            "output_folder (output_format=files)?"
        )
    parts, dropped = [], 0
    for table in tables:
        df = read_parquet(table)
        for col in ("key", "status"):
            if col not in df:
                raise DataError(
                    f"{table}: no '{col}' column (found {', '.join(map(str, df.columns))}); "
                    "not an img2dataset shard table"
                )
        ok = df["status"].astype(str) == "success"
        dropped += int((~ok).sum())
        df = df[ok].reset_index(drop=True)
        if "caption" not in df:
            raise DataError(
                f"{table}: no 'caption' column (found {', '.join(map(str, df.columns))}); "
                "run img2dataset with caption_col"
            )
        null = df["key"].isna()
        if null.any():
            raise DataError(f"{table}: row {int(null.values.argmax()) + 1}: the key is null (every image needs one)")
        check_captions(df["caption"], str(table))
        keys = df["key"].astype(str)
        files = table.stem + "/" + keys + "." + encode_format
        check_image_files(root, files, table, allow_outside_root, missing_ok=not check_files)
        parts.append(df.drop(columns=["key"]).assign(image_id=keys.values, file=files.values))
    out = pd.concat(parts, ignore_index=True)
    if out.empty:
        raise DataError(f"{root}: no row with status 'success' in {len(tables)} shard tables")
    dup = out["image_id"].duplicated()
    if dup.any():
        raise DataError(f"{root}: key '{out['image_id'][dup].iloc[0]}' appears in two shard tables")
    out = out[["image_id", "file", "caption"] + [c for c in out if c not in ("image_id", "file", "caption")]]
    if dropped:
        log.info(
            "img2dataset %s: %d of %d rows have status != success (no image; left out)",
            root,
            dropped,
            dropped + len(out),
        )
    out.attrs[NOT_SUCCESS] = dropped
    return out
