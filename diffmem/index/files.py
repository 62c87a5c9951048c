"""The index files of a run dir: ``index.faiss`` and ``index_info.json`` (factory, metric,
size, feature, measured recall; an on-disk IVF index's inverted-lists file, by name and
stamp). This module owns both names; everything else saves and loads through it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, cast

import faiss

from diffmem.errors import DataError
from diffmem.index.build import _METRIC_NAMES, _faiss_msg, _ivf, _metric_name
from diffmem.runs import atomic_path, file_stamp, write_json

INDEX_FILE = "index.faiss"
INFO_FILE = "index_info.json"


def _read_index(
    path: str | os.PathLike, what: str = "index", mmap: bool = False, ondisk_same_dir: bool = False
) -> faiss.Index:
    """Read a FAISS index file; ``ondisk_same_dir``: its on-disk inverted lists are the file
    of the recorded name beside it (not at the absolute path FAISS stored)."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    flags = (faiss.IO_FLAG_MMAP if mmap else 0) | (faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk_same_dir else 0)
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise DataError(f"{what} file {path} is not a readable FAISS index: {_faiss_msg(e)}") from None


def write_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write ``index`` to the file ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return path


def _factory_of(index: faiss.Index) -> str:
    """A factory-like description of common index types (callers should pass the real one)."""
    ix = faiss.downcast_index(index)  # non-owning view: `index` must stay referenced
    if isinstance(ix, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return "IDMap2," + _factory_of(ix.index)
    if isinstance(ix, faiss.IndexFlat):
        return "Flat"
    if isinstance(ix, faiss.IndexHNSWFlat):
        return f"HNSW{ix.hnsw.nb_neighbors(1)}"  # type: ignore[attr-defined]  # a method faiss's stubs leave out
    if isinstance(ix, faiss.IndexIVFFlat):
        return f"IVF{ix.nlist},Flat"
    if isinstance(ix, faiss.IndexIVFPQ):
        return f"IVF{ix.nlist},PQ{ix.pq.M}x{ix.pq.nbits}"
    if isinstance(ix, faiss.IndexPQ):
        return f"PQ{ix.pq.M}x{ix.pq.nbits}"
    return type(ix).__name__


def _describe(index: faiss.Index) -> dict[str, Any]:
    factory = _factory_of(index)
    out: dict[str, Any] = {
        "factory": factory,
        "metric": _METRIC_NAMES.get(index.metric_type, str(index.metric_type)),
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "index_class": type(index).__name__,
        "faiss_version": faiss.__version__,
    }
    ivf = _ivf(index)
    if ivf is not None:
        out["nlist"] = int(ivf.nlist)
        out["nprobe"] = int(ivf.nprobe)
    return out


def _ondisk_file(index: faiss.Index) -> Path | None:
    """The inverted-lists file of an on-disk IVF index (:func:`merge_shards` with
    ``ivfdata_path``), or None."""
    ivf = _ivf(index)
    lists = faiss.downcast_InvertedLists(cast(faiss.InvertedLists, ivf.invlists)) if ivf is not None else None
    return Path(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None


def _check_ivfdata(folder: Path, index_file: Path, recorded: dict) -> Path:
    """The on-disk inverted lists ``index_info.json`` records, checked to be the very file the
    index was built with before FAISS maps it (another file there would crash on access)."""
    path = folder / recorded["path"]  # relative: beside the index; absolute when built elsewhere
    if not path.is_file():
        raise DataError(f"{path}: not found (the on-disk inverted lists of {index_file})")
    now = file_stamp(path)
    if now != {k: recorded.get(k) for k in now}:
        raise DataError(
            f"{path} is not the inverted-lists file {index_file} was built with "
            f"({now['size']} bytes, recorded {recorded.get('size')}); rebuild the index"
        )
    return path


def save_index(index: faiss.Index, path: str | os.PathLike, info: dict | None = None) -> Path:
    """Write ``index.faiss`` and ``index_info.json`` into the folder ``path`` (atomically).

    ``index_info.json`` holds factory, metric, ntotal and dim (from the index) plus the
    caller's ``info`` (feature name, recall, ...); the caller's ``factory`` string wins
    over the one FAISS reconstructs. An on-disk IVF index's inverted-lists file is recorded
    by name when it lies in ``path`` (so the folder can move) and by a size/content stamp
    (so :func:`load_index` refuses any other file). Returns the folder.
    """
    path = Path(path)
    if path.suffix == ".faiss":
        path = path.parent
    path.mkdir(parents=True, exist_ok=True)
    meta = _describe(index)
    for key, val in (info or {}).items():
        if key in ("ntotal", "dim", "metric") and val is not None and meta[key] != val:
            raise DataError(f"index_info {key}={val!r} disagrees with the index ({meta[key]!r})")
        meta[key] = val
    meta["metric"] = _metric_name(meta["metric"])
    ondisk = _ondisk_file(index)
    if ondisk is not None:
        beside = ondisk.resolve().parent == path.resolve()
        meta["ivfdata"] = {"path": ondisk.name if beside else str(ondisk.resolve()), **file_stamp(ondisk)}
    write_index(index, path / INDEX_FILE)
    write_json(path / INFO_FILE, meta)
    return path


def load_index(path: str | os.PathLike, mmap: bool = False) -> tuple[faiss.Index, dict]:
    """Read ``index.faiss`` (+ ``index_info.json``) from a folder or the .faiss file path."""
    path = Path(path)
    folder = path.parent if path.suffix == ".faiss" else path
    index_file = path if path.suffix == ".faiss" else path / INDEX_FILE
    if not index_file.is_file():
        raise DataError(f"index file not found: {index_file} (run the index stage first)")
    info_file = folder / INFO_FILE
    info = None
    if info_file.is_file():
        import json

        try:
            info = json.loads(info_file.read_text())
        except ValueError as e:
            raise DataError(f"{info_file} is not valid JSON: {e}") from None
        if not isinstance(info, dict):
            raise DataError(f"{info_file}: expected a JSON object")
    ivfdata: Any = (info or {}).get("ivfdata")  # a JSON object or null
    if ivfdata:
        _check_ivfdata(folder, index_file, ivfdata)
    index = _read_index(
        index_file, "index", mmap=mmap, ondisk_same_dir=bool(ivfdata) and not Path(ivfdata["path"]).is_absolute()
    )
    if info is not None:
        if int(info.get("ntotal", index.ntotal)) != index.ntotal or int(info.get("dim", index.d)) != index.d:
            raise DataError(
                f"{info_file} (ntotal={info.get('ntotal')}, dim={info.get('dim')}) does "
                f"not describe {index_file} (ntotal={index.ntotal}, dim={index.d})"
            )
    else:
        warnings.warn(f"{info_file} missing; index metadata derived from the index", stacklevel=2)
        info = _describe(index)
    return index, info
