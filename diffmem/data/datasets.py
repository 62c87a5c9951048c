"""Image-text datasets: a folder + captions manifest, img2dataset output, webdataset shards,
or the generated testbed."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from diffmem.checks import check_positive, did_you_mean
from diffmem.data.decode import decode_image
from diffmem.data.inputs import check_captions, check_inside, leads_outside
from diffmem.data.webdataset import read_member, tar_member
from diffmem.errors import ConfigError, DataError
from diffmem.runs import read_parquet, require

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

PATH_COLUMNS = ("file", "path", "image", "file_name", "filename")
CAPTION_COLUMNS = ("caption", "text", "prompt")
ON_ERROR = ("fail", "skip")
DATA_KINDS = ("testbed", "testbed_photo", "photo_crops", "folder", "img2dataset", "webdataset")
#: The generated testbeds (ground-truth columns, testbed prompts and memorisation figures).
TESTBED_KINDS = ("testbed", "testbed_photo")
#: the default pixel budget of a decoded image (``data.max_pixels``): 80 Mpx, e.g. 8944 x 8944
MAX_PIXELS = 80_000_000


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


def _duplicate_name(names: Iterable[object]) -> str | None:
    """The first column name given twice (ignoring case and spaces around it), or None."""
    seen = set()
    for name in names:
        key = str(name).strip().lower()
        if key in seen:
            return str(name)
        seen.add(key)
    return None


class _DuplicateKey(ValueError):
    """A JSON object with a key twice (``json`` would keep the last silently)."""


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(next(k for i, k in enumerate(keys) if k in keys[:i]))
    return dict(pairs)


def _read_table(path: Path) -> pd.DataFrame:
    """CSV (``,``, ``;`` or tab; ``.tsv`` and ``.txt`` too), JSON lines or Parquet; errors name
    the file and line."""
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
                            row = json.loads(line, object_pairs_hook=_unique_keys)
                        except json.JSONDecodeError as err:
                            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
                        except _DuplicateKey as err:
                            raise DataError(
                                f"{path}:{lineno}: the key '{err}' appears twice (keys must be unique)"
                            ) from None
                        if not isinstance(row, dict):
                            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                        if "\\u" in line:  # an escape may spell a lone UTF-16 surrogate: not text
                            try:
                                json.dumps(row, ensure_ascii=False).encode("utf-8")
                            except UnicodeEncodeError as err:
                                raise DataError(
                                    f"{path}:{lineno}: a lone UTF-16 surrogate "
                                    f"({ascii(err.object[err.start])}) is not text"
                                ) from err
                        rows.append(row)
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        return pd.DataFrame(rows)
    if suffix in (".csv", ".tsv", ".txt"):
        try:
            head = path.read_text(encoding="utf-8-sig").split("\n", 1)[0]
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        sep = "\t" if suffix == ".tsv" or "\t" in head else (";" if head.count(";") > head.count(",") else ",")
        twice = _duplicate_name(next(csv.reader([head.rstrip("\r")], delimiter=sep), []))
        if twice is not None:
            raise DataError(f"{path}: the column '{twice}' appears twice in the header (columns must be unique)")
        try:
            df = pd.read_csv(path, sep=sep, keep_default_na=False, dtype=str, encoding="utf-8-sig")
        except pd.errors.EmptyDataError as err:
            raise DataError(f"{path}: the file is empty (no header line)") from err
        except pd.errors.ParserError as err:
            raise DataError(f"{path}: malformed CSV ({str(err).strip().splitlines()[-1]})") from err
        if not isinstance(df.index, pd.RangeIndex):  # pandas made the surplus leading fields an index
            raise DataError(f"{path}: malformed CSV ({_surplus_fields(path, sep)})")
        return df
    raise DataError(f"{path}: unknown manifest format '{suffix}' (use .csv, .tsv, .txt, .jsonl or .parquet)")


def _surplus_fields(path: Path, sep: str) -> str:
    """Where a CSV row has more fields than its header (pandas would shift the columns)."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = csv.reader(fh, delimiter=sep)
        width = len(next(rows, []))
        for row in rows:
            if len(row) > width:
                return f"line {rows.line_num}: {len(row)} fields, the header has {width}"
    return f"rows have more fields than the header's {width}"


def _pick(df: pd.DataFrame, names: Sequence[str], path: Path, what: str) -> str:
    """The first column of ``df`` named one of ``names``, ignoring case and spaces around it."""
    by_name = {str(c).strip().lower(): c for c in reversed(df.columns)}
    for name in names:
        if name in by_name:
            return by_name[name]
    raise DataError(
        f"{path}: no {what} column (expected one of {', '.join(names)}; "
        f"found {', '.join(map(str, df.columns)) or 'none'})"
    )


def _first_bad_row(root: Path, files: Iterable[str], contain: bool, missing_ok: bool = False) -> tuple[int, str] | None:
    """``(index, why)`` of the first of ``files`` that is not a regular file under ``root`` (or,
    with ``contain``, that :func:`leads_outside` it), else None; with ``missing_ok`` a missing
    file passes.

    Each folder is listed once (a directory read returns many names per call), so a manifest
    of millions of images costs one listing per folder, not one ``stat`` per image; only
    symlinks and names not listed (another Unicode normalisation, say) are looked up."""
    listed: dict[str, tuple[dict[str, str], bool]] = {}
    for i, file in enumerate(files):
        if contain and leads_outside(root, file, resolve=False):
            return i, "outside"
        parent, _, name = file.replace(os.sep, "/").rpartition("/")
        if parent not in listed:
            ok = not contain or not leads_outside(root, parent)
            try:
                with os.scandir(root / parent) as entries:
                    kinds = {e.name: "link" if e.is_symlink() else "file" if e.is_file() else "other" for e in entries}
            except OSError:
                kinds = {}
            listed[parent] = kinds, ok
        kinds, ok = listed[parent]
        if not ok:
            return i, "outside"
        kind = kinds.get(name)
        if kind == "file":
            continue
        path = root / file
        if kind is None and not path.exists():
            if missing_ok:
                continue
            return i, "missing"
        if contain and leads_outside(root, file):
            return i, "outside"
        if not stat.S_ISREG(path.stat().st_mode):
            return i, "not a file"
    return None


def check_image_files(
    root: Path, files: Iterable[str], where: Path, allow_outside_root: bool = False, missing_ok: bool = False
) -> None:
    """Refuse the first of a manifest's ``files`` that leads outside ``root`` (unless
    ``allow_outside_root``), is missing (unless ``missing_ok``) or is no regular file, naming
    the manifest ``where`` and the row; before any work starts."""
    rows = pd.Series(files).reset_index(drop=True)
    bad = _first_bad_row(root, rows, not allow_outside_root, missing_ok)
    if bad is not None:
        i, why = bad
        at = f"{where}: row {i + 1}: image "
        if why == "outside":
            check_inside(root, rows[i], at)
        if why == "not a file":
            raise DataError(f"{at}'{rows[i]}' is not a regular file")
        raise DataError(f"{at}'{rows[i]}' not found under {root}")


def load_folder_manifest(
    root: str | Path, manifest: str | Path, allow_outside_root: bool = False, check_files: bool = True
) -> pd.DataFrame:
    """A folder of images + a captions file -> manifest with ``image_id, file, caption``.

    Column names are matched ignoring case (``File``, ``Caption``). Every image must be a
    regular file inside ``root`` (no ``..``, absolute paths or symlinks leading out, so a
    manifest cannot make diffmem read, and show in a report, files elsewhere) unless
    ``allow_outside_root``; ``check_files`` refuses a missing image (naming the row) before
    any work starts (``data.on_error=skip`` leaves that to the embedding)."""
    root = Path(root)
    mpath = Path(manifest) if Path(manifest).is_absolute() else root / manifest
    df = _read_table(mpath)
    if df.empty:
        raise DataError(f"{mpath}: the manifest has no rows")
    pcol, ccol = _pick(df, PATH_COLUMNS, mpath, "image path"), _pick(df, CAPTION_COLUMNS, mpath, "caption")
    check_captions(df[ccol], str(mpath))
    out = pd.DataFrame({"file": df[pcol].astype(str), "caption": df[ccol]})
    out.insert(
        0, "image_id", df["image_id"].astype(str) if "image_id" in df else [f"img{i:07d}" for i in range(len(df))]
    )
    dup = out["image_id"].duplicated()
    if dup.any():
        raise DataError(
            f"{mpath}: duplicate image_id '{out['image_id'][dup].iloc[0]}' (row {int(np.argmax(dup.values)) + 1})"
        )
    check_image_files(root, out["file"], mpath, allow_outside_root, missing_ok=not check_files)
    for col in df.columns.difference([pcol, ccol, "image_id"]):
        out[col] = df[col].values
    return out


def list_folder_images(root: str | Path, allow_outside_root: bool = False) -> pd.DataFrame:
    """Every image file under ``root`` (any depth, sorted; hidden files and folders left out),
    uncaptioned: ``image_id, file, caption`` (null). What ``data=folder`` without a manifest
    gives the stages that need no captions (embed, dedup); symlinks out of ``root`` are refused
    unless ``allow_outside_root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (data.root)")
    exts = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(here).relative_to(root)
        files += [
            (rel / n).as_posix() for n in sorted(names) if not n.startswith(".") and Path(n).suffix.lower() in exts
        ]
    if not files:
        raise DataError(f"{root}: no image files under the folder (data.manifest=null lists them)")
    check_image_files(root, files, root, allow_outside_root)
    return pd.DataFrame({"image_id": [f"img{i:07d}" for i in range(len(files))], "file": files, "caption": None})


def select_subset(manifest: pd.DataFrame, subset: Mapping[str, Any] | None) -> pd.DataFrame:
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
        raise ConfigError(
            f"data.subset.size: two disjoint parts of {size} images need {2 * size}, "
            f"the dataset has {len(files)}{what} images"
        )
    order = np.random.default_rng(int(subset.get("seed", 0))).permutation(len(files))
    chosen = files[order[part * size : (part + 1) * size]]
    return rows[rows["file"].isin(chosen)].reset_index(drop=True)


def on_error(data_cfg: Mapping[str, Any]) -> str:
    """``data.on_error`` (``fail`` when unset): what to do with an image that cannot be read."""
    value = data_cfg.get("on_error") or "fail"
    if value not in ON_ERROR:
        raise ConfigError(f"data.on_error '{value}' is not one of {', '.join(ON_ERROR)}{did_you_mean(value, ON_ERROR)}")
    return value


def load_dataset(cfg: DictConfig, captions: bool = True) -> tuple[Path, pd.DataFrame]:
    """``(root, manifest)`` for a ``data`` config (``kind``: one of ``DATA_KINDS``), restricted
    to ``data.subset`` when it is set (:func:`select_subset`). Without ``captions`` (a stage
    that reads only the images), ``data=folder`` needs no manifest: :func:`list_folder_images`."""
    if cfg.kind in TESTBED_KINDS:
        from diffmem.data.testbed import generate_testbed
        from diffmem.data.testbed_photo import generate_testbed_photo

        kwargs = {
            k: cfg[k]
            for k in (
                "seed",
                "resolution",
                "n_ordinary",
                "canaries_per_count",
                "n_templates",
                "template_copies",
                "n_heldout",
            )
        }
        generate = generate_testbed if cfg.kind == "testbed" else generate_testbed_photo
        df = generate(cfg.root, canary_counts=tuple(cfg.canary_counts), **kwargs)
    elif cfg.kind == "photo_crops":
        from diffmem.data.testbed_photo import photo_crops

        df = photo_crops(cfg.root, seed=cfg.seed, resolution=cfg.resolution, n=cfg.n)
    elif cfg.kind == "folder" and not captions and cfg.get("manifest") in (None, ""):
        require(cfg, "root", prefix="data.", hint="data=folder needs data.root=<image folder>")
        df = list_folder_images(cfg.root, bool(cfg.get("allow_outside_root", False)))
    elif cfg.kind == "folder":
        require(
            cfg,
            "root",
            "manifest",
            prefix="data.",
            hint="data=folder needs data.root=<image folder> and data.manifest=<captions file> "
            "(embed and dedup also read a folder without one)",
        )
        df = load_folder_manifest(
            cfg.root, cfg.manifest, bool(cfg.get("allow_outside_root", False)), check_files=on_error(cfg) == "fail"
        )
    elif cfg.kind == "img2dataset":
        from diffmem.data.img2dataset import load_img2dataset

        require(cfg, "root", prefix="data.", hint="data=img2dataset needs data.root=<img2dataset's output_folder>")
        df = load_img2dataset(
            cfg.root,
            cfg.get("encode_format") or "jpg",
            bool(cfg.get("allow_outside_root", False)),
            check_files=on_error(cfg) == "fail",
        )
    elif cfg.kind == "webdataset":
        from diffmem.data.webdataset import load_webdataset

        require(cfg, "root", prefix="data.", hint="data=webdataset needs data.root=<folder of .tar shards>")
        df = load_webdataset(cfg.root, cfg.get("shards") or "*.tar", bool(cfg.get("allow_outside_root", False)))
    else:
        raise ConfigError(
            f"data.kind '{cfg.kind}' is not one of {', '.join(DATA_KINDS)}{did_you_mean(str(cfg.kind), DATA_KINDS)}"
        )
    on_error(cfg)
    check_positive(cfg.get("max_pixels", MAX_PIXELS), "data.max_pixels")
    return Path(cfg.root), select_subset(df, cfg.get("subset"))


def load_image(
    path: str | Path, resolution: int | None = None, max_pixels: int = MAX_PIXELS, **resize: Any
) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] as displayed (:mod:`diffmem.data.decode`: EXIF
    orientation, float and 16-bit scaling, alpha over white), resized (bicubic) to a square
    ``resolution`` if given, then to a descriptor's size (``resize``: ``size`` and
    ``resample`` of :func:`~diffmem.data.decode.decode_image`; a JPEG is then decoded at
    reduced size). ``path`` may name a member of a webdataset shard
    (``<root>/<shard>.tar/<member>``), read in place. An image declaring more than
    ``max_pixels`` pixels is refused before it is decoded (a small file can declare a huge
    image: a decompression bomb).
    """
    path = Path(path)
    member = tar_member(path)
    if member is None:
        check_regular(path, "image file")
    source = io.BytesIO(read_member(*member)) if member else path  # errors name the member
    try:
        return decode_image(source, resolution, max_pixels, **resize)
    except DataError as err:  # the pixel budget
        raise DataError(f"{path}: {err}") from err
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: over PIL's decompression-bomb limit ({err})") from err
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except UnidentifiedImageError as err:  # PIL's message names the stream, not the file
        raise DataError(f"{path}: corrupt or unreadable image (not a format PIL can identify)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or unreadable image ({err})") from err


def load_images(root: str | Path, files: Iterable[str], resolution: int | None = None) -> np.ndarray:
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


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 torch tensor [N, 3, H, W] in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_unit_images(root: str | Path, files: Iterable[str], resolution: int | None = None) -> torch.Tensor:
    """:func:`load_images` as a float32 tensor ``[N, 3, H, W]`` in [0, 1] (descriptors' range)."""
    return (to_tensor(load_images(root, files, resolution)) + 1) / 2
