"""Image-text datasets: a folder + captions manifest, or the generated testbed."""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from diffmem.checks import check_positive
from diffmem.errors import ConfigError, DataError
from diffmem.runs import read_parquet, require

PATH_COLUMNS = ("file", "path", "image", "file_name", "filename")
CAPTION_COLUMNS = ("caption", "text", "Caption", "prompt")
#: the default pixel budget of a decoded image (``data.max_pixels``): 80 Mpx, e.g. 8944 x 8944
MAX_PIXELS = 80_000_000
#: ``data`` settings that only guard (refuse inputs), never change a result
GUARDS = ("max_pixels", "allow_outside_root")


def without_guards(data: dict) -> dict:
    """``data`` settings as a run's fingerprint: without :data:`GUARDS`, so a run refused for a
    too large image resumes with a raised ``data.max_pixels``."""
    return {k: v for k, v in data.items() if k not in GUARDS}


def check_regular(path: Path, what: str = "file") -> None:
    """Refuse a missing input, or one that is no regular file (a FIFO or device would hang
    or never end; symlinks are followed), before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise DataError(f"{path}: {what} not found") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from err
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a folder, FIFO or device); inputs must be files")


def _read_table(path: Path) -> pd.DataFrame:
    """CSV (``,`` or ``;``), JSON lines or Parquet; errors name the file and line."""
    check_regular(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8-sig", errors="strict") as fh:
            try:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as err:
                            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
                        if not isinstance(row, dict):
                            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                        rows.append(row)
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        return pd.DataFrame(rows)
    if suffix in (".csv", ".tsv", ".txt"):
        try:
            head = path.read_text(encoding="utf-8-sig").split("\n", 1)[0]
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        sep = "\t" if suffix == ".tsv" else (";" if head.count(";") > head.count(",") else ",")
        try:
            df = pd.read_csv(path, sep=sep, keep_default_na=False, dtype=str, encoding="utf-8-sig")
        except pd.errors.EmptyDataError as err:
            raise DataError(f"{path}: the file is empty (no header line)") from err
        except pd.errors.ParserError as err:
            raise DataError(f"{path}: malformed CSV ({str(err).strip().splitlines()[-1]})") from err
        if not isinstance(df.index, pd.RangeIndex):  # pandas made the surplus leading fields an index
            raise DataError(f"{path}: malformed CSV ({_surplus_fields(path, sep)})")
        return df
    raise DataError(f"{path}: unknown manifest format '{suffix}' (use .csv, .jsonl or .parquet)")


def _surplus_fields(path: Path, sep: str) -> str:
    """Where a CSV row has more fields than its header (pandas would shift the columns)."""
    import csv

    with open(path, encoding="utf-8", newline="") as fh:
        rows = csv.reader(fh, delimiter=sep)
        width = len(next(rows, []))
        for row in rows:
            if len(row) > width:
                return f"line {rows.line_num}: {len(row)} fields, the header has {width}"
    return f"rows have more fields than the header's {width}"


def _pick(df: pd.DataFrame, names, path: Path, what: str) -> str:
    for name in names:
        if name in df.columns:
            return name
    raise DataError(f"{path}: no {what} column (expected one of {', '.join(names)}; "
                    f"found {', '.join(map(str, df.columns)) or 'none'})")


def load_folder_manifest(root: str | Path, manifest: str | Path,
                         allow_outside_root: bool = False) -> pd.DataFrame:
    """A folder of images + a captions file -> manifest with ``image_id, file, caption``.

    Every image must be a regular file inside ``root`` (no ``..``, absolute paths or symlinks
    leading out, so a manifest cannot make diffmem read, and show in a report, files
    elsewhere) unless ``allow_outside_root``."""
    root = Path(root)
    inside = None if allow_outside_root else root.resolve()
    mpath = Path(manifest) if Path(manifest).is_absolute() else root / manifest
    df = _read_table(mpath)
    if df.empty:
        raise DataError(f"{mpath}: the manifest has no rows")
    pcol, ccol = _pick(df, PATH_COLUMNS, mpath, "image path"), _pick(df, CAPTION_COLUMNS, mpath, "caption")
    out = pd.DataFrame({"file": df[pcol].astype(str), "caption": df[ccol].astype(str)})
    out.insert(0, "image_id", df["image_id"].astype(str) if "image_id" in df else
               [f"img{i:07d}" for i in range(len(df))])
    dup = out["image_id"].duplicated()
    if dup.any():
        raise DataError(f"{mpath}: duplicate image_id '{out['image_id'][dup].iloc[0]}' "
                        f"(row {int(np.argmax(dup.values)) + 1})")
    for i, file in enumerate(out["file"]):
        path = root / file
        if not path.exists():
            raise DataError(f"{mpath}: row {i + 1}: image '{file}' not found under {root}")
        if inside is not None and not path.resolve().is_relative_to(inside):
            raise DataError(f"{mpath}: row {i + 1}: image '{file}' is outside data.root {root} "
                            "(set data.allow_outside_root=true to read it)")
        if not stat.S_ISREG(path.stat().st_mode):
            raise DataError(f"{mpath}: row {i + 1}: image '{file}' is not a regular file")
    for col in df.columns.difference([pcol, ccol, "image_id"]):
        out[col] = df[col].values
    return out


def select_subset(manifest: pd.DataFrame, subset) -> pd.DataFrame:
    """Part ``subset.part`` (0 or 1) of two disjoint random sets of ``subset.size`` images.

    The images (unique files) of the rows whose ``kind`` is in ``subset.kinds`` (null: every
    row) are permuted with ``subset.seed``; part p takes images [p * size, (p + 1) * size) of
    that order, so the two parts never share an image. Returns those images' rows (every
    other row is dropped); ``subset`` null returns ``manifest`` unchanged.
    """
    if subset is None:
        return manifest
    size, part, kinds = check_positive(subset["size"], "data.subset.size"), int(subset["part"]), subset.get("kinds")
    if part not in (0, 1):
        raise ConfigError(f"data.subset.part must be 0 or 1 (got {part})")
    rows = manifest
    if kinds is not None:
        if "kind" not in manifest:
            raise ConfigError("data.subset.kinds: the dataset has no 'kind' column (use kinds: null)")
        rows = manifest[manifest["kind"].isin(list(kinds))]
    files = rows["file"].unique()
    if 2 * size > len(files):
        what = "" if kinds is None else " " + "/".join(kinds)
        raise ConfigError(f"data.subset.size: two disjoint parts of {size} images need {2 * size}, "
                          f"the dataset has {len(files)}{what} images")
    order = np.random.default_rng(int(subset.get("seed", 0))).permutation(len(files))
    chosen = files[order[part * size:(part + 1) * size]]
    return rows[rows["file"].isin(chosen)].reset_index(drop=True)


def load_dataset(cfg) -> tuple[Path, pd.DataFrame]:
    """``(root, manifest)`` for a ``data`` config (``kind: testbed`` or ``kind: folder``),
    restricted to ``data.subset`` when it is set (:func:`select_subset`)."""
    if cfg.kind == "testbed":
        from diffmem.data.testbed import generate_testbed

        kwargs = {k: cfg[k] for k in ("seed", "resolution", "n_ordinary", "canaries_per_count",
                                      "n_templates", "template_copies", "n_heldout")}
        df = generate_testbed(cfg.root, canary_counts=tuple(cfg.canary_counts), **kwargs)
    elif cfg.kind == "folder":
        require(cfg, "root", "manifest", prefix="data.",
                hint="data=folder needs data.root=<image folder> and data.manifest=<captions file>")
        max_pixels = cfg.get("max_pixels", MAX_PIXELS)
        if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
            raise ConfigError(f"data.max_pixels must be an integer >= 1 (got {max_pixels!r})")
        df = load_folder_manifest(cfg.root, cfg.manifest, bool(cfg.get("allow_outside_root", False)))
    else:
        raise ConfigError(f"data.kind '{cfg.kind}' is not one of testbed, folder")
    return Path(cfg.root), select_subset(df, cfg.get("subset"))


def load_image(path: str | Path, resolution: int | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An RGB uint8 array [H, W, 3], resized (bicubic) to a square ``resolution`` if given.

    Grayscale (8 or 16 bit), palette, CMYK and alpha images are converted to RGB (alpha
    over white). An image declaring more than ``max_pixels`` pixels is refused before it
    is decoded (a small file can declare a huge image: a decompression bomb).
    """
    path = Path(path)
    check_regular(path, "image file")
    try:
        with warnings.catch_warnings():
            # the budget below decides; PIL's own limit (twice its warning size) still raises
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.width * im.height > max_pixels:
                raise DataError(f"{path}: a {im.width}x{im.height} image is over the pixel budget "
                                f"data.max_pixels={max_pixels} (a decompression bomb?)")
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: PIL would clip
                im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round()
                                    .clip(0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            if resolution is not None and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: over PIL's decompression-bomb limit ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or unreadable image ({err})") from err


def load_images(root: str | Path, files, resolution: int | None = None) -> np.ndarray:
    """Stack of images [N, H, W, 3] uint8; a file read once however often it is listed."""
    root = Path(root)
    cache: dict[str, np.ndarray] = {}
    out = []
    for f in files:
        if f not in cache:
            cache[f] = load_image(root / f, resolution)
        out.append(cache[f])
    if not out:
        raise DataError(f"{root}: no images to load (empty dataset)")
    return np.stack(out)


def to_tensor(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float32 torch tensor [N, 3, H, W] in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_unit_images(root: str | Path, files, resolution: int | None = None):
    """:func:`load_images` as a float32 tensor ``[N, 3, H, W]`` in [0, 1] (descriptors' range)."""
    return (to_tensor(load_images(root, files, resolution)) + 1) / 2
