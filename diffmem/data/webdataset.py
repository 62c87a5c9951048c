"""webdataset tar shards (``data=webdataset``), read in place: never unpacked to disk.

A shard is an uncompressed ``.tar`` of samples, each a group of members sharing a key
(the member name up to its first dot): ``<key>.jpg`` (or png/webp/...) and a caption in
``<key>.txt`` or ``<key>.json`` (its ``caption`` or ``text`` field). img2dataset's
``output_format=webdataset`` writes exactly this.

The manifest is built by streaming each shard's headers once (captions are the only
payload read). An image's ``file`` is ``<shard>.tar/<member>`` under ``data.root``, so the
ids and resume of an embed run work as for a folder, and :func:`read_member` reads one
image by seeking to its offset (the shard's member table is built once per process).
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from diffmem.data.inputs import check_captions, check_inside
from diffmem.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif")
CAPTION_EXTENSIONS = ("txt", "json")

#: shard path -> {member name: (data offset, size)}, filled on first use in each process
_MEMBERS: dict[Path, dict[str, tuple[int, int]]] = {}


def split_key(name: str) -> tuple[str, str]:
    """``("dir/000123", "jpg")`` for member ``dir/000123.jpg`` (webdataset's key rule:
    the extension starts at the basename's first dot)."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    return str(path.with_name(stem)), ext.lower()


def _caption(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, shard: Path) -> Any:
    """The caption of a ``.txt`` member, or the ``caption``/``text`` field of a ``.json`` one as
    stored (a list or null is refused with the manifest, naming the sample)."""
    fh = tar.extractfile(member)
    assert fh is not None  # a regular member: _scan passes no other
    raw = fh.read()
    try:
        text = raw.decode("utf-8")
        if ext == "txt":
            return text.strip()
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{shard}: member {member.name}: unreadable caption ({err})") from err
    return doc.get("caption", doc.get("text")) if isinstance(doc, dict) else None


def _scan(shard: Path) -> tuple[dict[str, tuple[int, int]], list[dict]]:
    """One streamed pass over ``shard``: its member table and one row per sample with an image."""
    members: dict[str, tuple[int, int]] = {}
    samples: dict[str, dict] = {}
    twice: list[str] = []
    try:
        with tarfile.open(shard, mode="r|", encoding="utf-8", errors="strict") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.name in members:  # tar -r appends: the last copy is the one tar extracts
                    twice.append(m.name)
                members[m.name] = (m.offset_data, m.size)
                key, ext = split_key(m.name)
                row = samples.setdefault(key, {"key": key})
                if ext in IMAGE_EXTENSIONS:
                    row.setdefault("member", m.name)
                elif ext in CAPTION_EXTENSIONS and (ext == "txt" or "caption" not in row):
                    row["caption"] = _caption(tar, m, ext, shard)
    except UnicodeDecodeError as err:
        raise DataError(f"{shard}: a member name is not UTF-8 ({ascii(err.object[:80])}); rename it") from None
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{shard}: not a readable tar shard ({err})") from err
    if twice:
        log.warning(
            "%s: %d member(s) stored twice (first: %s); the last copy is read, as tar extracts it",
            shard,
            len(twice),
            twice[0],
        )
    return members, [r for r in samples.values() if "member" in r]


def load_webdataset(root: str | Path, shards: str = "*.tar", allow_outside_root: bool = False) -> pd.DataFrame:
    """The manifest of the shards matching ``shards`` under ``root`` (sorted by name):
    ``image_id`` (the sample key), ``file`` (``<shard>/<member>``; ``<member>`` when ``root`` is
    one shard: files are relative to ``root``), ``caption``, ``shard``.
    A shard outside ``root`` (``../*.tar``, a symlink out) is refused unless
    ``allow_outside_root``; so is a caption that is not a non-blank string, naming the sample."""
    root = Path(root)
    if Path(shards).is_absolute():
        raise ConfigError(f"data.shards='{shards}' must be a glob relative to data.root {root}")
    paths = [root] if root.is_file() else sorted(p for p in root.glob(shards) if p.is_file())
    if not paths:
        raise DataError(f"{root}: no tar shards matching '{shards}' (data.shards)")
    base = root.parent if root.is_file() else root
    for shard in paths:
        check_inside(base, shard.relative_to(base), f"data.shards='{shards}': shard ", allow_outside_root)
    rows = []
    for shard in paths:
        members, samples = _scan(shard)
        _MEMBERS[shard.resolve()] = members
        rel = shard.relative_to(base).as_posix()
        inside = "" if root.is_file() else f"{rel}/"  # files are relative to root, a .tar itself here
        rows += [
            {"image_id": s["key"], "file": f"{inside}{s['member']}", "caption": s.get("caption"), "shard": rel}
            for s in samples
        ]
    if not rows:
        raise DataError(f"{root}: the shards hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    df = pd.DataFrame(rows)
    check_captions(df["caption"], str(root), rows=df["file"].tolist())
    dup = df["image_id"].duplicated()
    if dup.any():
        key = df["image_id"][dup].iloc[0]
        where = ", ".join(df.loc[df["image_id"] == key, "file"].head(2))
        raise DataError(f"{root}: sample key '{key}' appears twice ({where}); keys must be unique across shards")
    return df


def tar_member(path: str | Path) -> tuple[Path, str] | None:
    """``(shard, member)`` when ``path`` names a member inside a ``.tar`` file, else None."""
    path = Path(path)
    for parent in path.parents:
        if parent.suffix == ".tar" and parent.is_file():
            return parent, path.relative_to(parent).as_posix()
    return None


def read_member(shard: Path, member: str) -> bytes:
    """The bytes of ``member`` of ``shard``, read by seeking to it (no scan after the first)."""
    key = shard.resolve()
    if key not in _MEMBERS:
        _MEMBERS[key] = _scan(shard)[0]
    if member not in _MEMBERS[key]:
        raise DataError(f"{shard}/{member}: no such member in the shard")
    offset, size = _MEMBERS[key][member]
    with open(shard, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)
