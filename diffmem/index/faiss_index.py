"""FAISS indexes over L2-normalised image descriptors: build, shard, merge, save, search.

The default is an exact ``Flat`` index with inner-product metric (cosine on
L2-normalised features), because memorisation scores need the exact top-k.
Approximate indexes (IVF, PQ, HNSW) are built from FAISS ``index_factory`` strings
and carry their measured recall against the exact index in ``index_info.json``.

Large sets follow FAISS's "indexes that do not fit in RAM" recipe:
``train_empty_index`` once, ``add_shard`` in parallel jobs, ``merge_shards``.
``streaming_search`` is the memory-bounded exact alternative that never builds
an index: it streams ``.npy`` shards (memory-mapped) and keeps a running top-k.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import faiss
import numpy as np

from diffmem.checks import check_positive
from diffmem.errors import ConfigError, DataError
from diffmem.runs import atomic_path, file_stamp, write_json

LOG = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INFO_FILE = "index_info.json"
NORM_TOL = 1e-3
ADD_CHUNK = 65536          # rows per add() call
CHECK_CHUNK = 16384        # rows per validation step (bounds temporaries)
SEARCH_BATCH = 16384       # queries per search() call
STREAM_CHUNK = 262144      # database rows per streaming step
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per centroid
# Database rows per BLAS block in exact (Flat / knn) search. FAISS's default (1024) makes
# many small sgemm calls + OpenMP barriers; 8192 was 1.3-2x faster on 2 cores (see
# benchmarks/bench_search.py) at the cost of a query_bs x 8192 float32 buffer (128 MB).
FLAT_BLAS_DATABASE_BS = 8192

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_METRIC_NAMES = {v: k for k, v in _METRICS.items()}

__all__ = [
    "check_features", "build_index", "set_search_params", "train_empty_index", "add_shard",
    "merge_shards", "save_index", "write_index", "load_index", "search", "recall_at_k",
    "measure_recall", "streaming_search", "set_threads", "INDEX_FILE", "INFO_FILE",
]


def set_threads(threads: int | None) -> None:
    """FAISS's OpenMP threads (``threads``; null keeps its default, one per core)."""
    if threads:
        faiss.omp_set_num_threads(check_positive(threads, "threads"))


# ---------------------------------------------------------------------------- checks

def _metric(metric: str | int) -> int:
    if isinstance(metric, (int, np.integer)) and int(metric) in _METRIC_NAMES:
        return int(metric)
    key = str(metric).lower()
    if key in ("inner_product", "cosine", "dot"):
        key = "ip"
    if key not in _METRICS:
        raise ConfigError(f"unknown index metric {metric!r}; use 'ip' (cosine on normalised "
                          f"features) or 'l2'")
    return _METRICS[key]


def _metric_name(metric: str | int) -> str:
    return _METRIC_NAMES[_metric(metric)]


def check_features(x: Any, name: str = "features", dim: int | None = None,
                   normalized: bool = True) -> np.ndarray:
    """Return ``x`` as a float32 C-contiguous ``[N, D]`` array, or raise DataError.

    Checks: 2-D, non-empty, ``D == dim`` when given, all values finite and, when
    ``normalized`` (the inner-product metric), every row of unit L2 norm within 1e-3.
    A float32 C-contiguous input (including a memory map) is returned without a copy;
    the checks run in row chunks so they need no full-size temporaries.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().numpy()
    try:
        x = np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name}: cannot be read as a float32 array ({e})") from None
    if x.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array [N, D], got shape {tuple(x.shape)}")
    n, d = x.shape
    if n == 0 or d == 0:
        raise DataError(f"{name}: empty array of shape {tuple(x.shape)}; nothing to index or search")
    if dim is not None and d != int(dim):
        raise DataError(f"{name}: have D={d}, expected D={int(dim)}")
    bad_finite = 0
    bad_norm = 0
    lo, hi = np.inf, -np.inf
    for s in range(0, n, CHECK_CHUNK):
        c = x[s:s + CHECK_CHUNK]
        fin = np.isfinite(c).all(axis=1)
        bad_finite += int((~fin).sum())
        if normalized and fin.any():
            cf = c if fin.all() else c[fin]
            nrm = np.sqrt(np.einsum("ij,ij->i", cf, cf))
            off = np.abs(nrm - 1.0) > NORM_TOL
            if off.any():
                bad_norm += int(off.sum())
                lo, hi = min(lo, float(nrm[off].min())), max(hi, float(nrm[off].max()))
    if bad_finite:
        raise DataError(f"{name}: {bad_finite} of {n} rows contain NaN or infinite values")
    if bad_norm:
        raise DataError(
            f"{name}: {bad_norm} of {n} rows are not L2-normalised (norms {lo:.4g}..{hi:.4g}, "
            f"tolerance {NORM_TOL:g}); normalise them (x / ||x||) or use metric l2")
    return x


def _ids_array(ids: Any, n: int, name: str = "ids") -> np.ndarray:
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if ids.shape[0] != n:
        raise DataError(f"{name}: {ids.shape[0]} ids for {n} vectors")
    if n and ids.min() < 0:
        raise DataError(f"{name}: ids must be >= 0 (-1 marks 'no result' in FAISS)")
    if np.unique(ids).shape[0] != n:
        raise DataError(f"{name}: {n - np.unique(ids).shape[0]} duplicate ids")
    return ids


# ---------------------------------------------------------------------------- build

def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError, AttributeError):
        return None


def _faiss_msg(e: BaseException) -> str:
    """The useful part of a FAISS C++ exception: drop 'Error in <function> at <file>:<line>:'."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    line = next((ln for ln in lines if ln.startswith("Error in ")), lines[-1] if lines else str(e))
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", line)


def _make_index(dim: int, factory: str, metric: str | int) -> faiss.Index:
    if not isinstance(factory, str) or not factory.strip():
        raise ConfigError(f"index factory must be a non-empty FAISS factory string, got {factory!r}")
    try:
        return faiss.index_factory(int(dim), factory.strip(), _metric(metric))
    except RuntimeError as e:
        raise ConfigError(f"invalid FAISS factory string {factory!r} for D={dim} "
                          f"(e.g. 'Flat', 'IVF1024,Flat', 'IVF1024,PQ16', 'HNSW32'): "
                          f"{_faiss_msg(e)}") from None


def _check_train_size(index: faiss.Index, n_train: int, factory: str) -> None:
    ivf = _ivf(index)
    if ivf is not None:
        nlist = int(ivf.nlist)
        if n_train < nlist:
            raise ConfigError(f"index {factory!r} has nlist={nlist} lists but only {n_train} "
                              f"training vectors; use a smaller nlist or more training data")
        if n_train < MIN_POINTS_PER_CENTROID * nlist:
            warnings.warn(f"index {factory!r}: {n_train} training vectors for nlist={nlist} "
                          f"(FAISS wants >= {MIN_POINTS_PER_CENTROID * nlist}); the "
                          f"clustering may be poor", stacklevel=3)


def _train(index: faiss.Index, sample: np.ndarray, factory: str, seed: int) -> None:
    if index.is_trained:
        return
    _check_train_size(index, sample.shape[0], factory)
    ivf = _ivf(index)
    if ivf is not None:
        ivf.cp.seed = int(seed)
        ivfpq = faiss.try_extract_index_ivf(index)
        if isinstance(faiss.downcast_index(ivfpq), faiss.IndexIVFPQ):
            # polysemous training (~4 s per sub-quantizer, whatever the data size) only
            # helps Hamming pre-filtering (polysemous_ht), which diffmem never enables
            faiss.downcast_index(ivfpq).do_polysemous_training = False
    try:
        index.train(sample)
    except RuntimeError as e:
        raise ConfigError(f"training index {factory!r} on {sample.shape[0]} vectors failed: "
                          f"{_faiss_msg(e)}") from None


def _supports_ids(index: faiss.Index) -> bool:
    return isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) or _ivf(index) is not None


def _with_ids(index: faiss.Index) -> faiss.Index:
    """Wrap an index that cannot store ids (Flat, PQ, HNSW) in an IndexIDMap2."""
    if _supports_ids(index):
        return index
    if index.ntotal:
        raise DataError("cannot attach ids to an index that already holds vectors without ids")
    wrapped = faiss.IndexIDMap2(index)
    wrapped.referenced_objects = [index]  # keep the inner index alive with the wrapper
    return wrapped


def _add(index: faiss.Index, x: np.ndarray, ids: np.ndarray | None = None) -> None:
    for s in range(0, x.shape[0], ADD_CHUNK):
        c = np.ascontiguousarray(x[s:s + ADD_CHUNK])
        if ids is None:
            index.add(c)
        else:
            index.add_with_ids(c, ids[s:s + ADD_CHUNK])


def set_search_params(index: faiss.Index, nprobe: int | None = None,
                      hnsw_ef_search: int | None = None) -> faiss.Index:
    """Set IVF ``nprobe`` / HNSW ``efSearch`` (also through IDMap / PreTransform wrappers)."""
    ps = faiss.ParameterSpace()
    for key, val in (("nprobe", nprobe), ("efSearch", hnsw_ef_search)):
        if val is None:
            continue
        check_positive(val, key)
        try:
            ps.set_index_parameter(index, key, int(val))
        except RuntimeError:
            kind = "IVF" if key == "nprobe" else "HNSW"
            raise ConfigError(f"{key}={val} given but the index ({type(index).__name__}) is "
                              f"not an {kind} index; leave it unset") from None
    ivf = _ivf(index)
    if ivf is not None and nprobe is not None and int(nprobe) > ivf.nlist:
        warnings.warn(f"nprobe={nprobe} exceeds nlist={ivf.nlist}; every list is scanned",
                      stacklevel=2)
    return index


def training_rows(n: int, train_sample: int | None, seed: int) -> np.ndarray | None:
    """The sorted rows an untrained index is trained on (None: all ``n``). The single and the
    sharded build both draw them here, so both train the same index."""
    check_positive(train_sample, "train_sample", optional=True)
    if train_sample is None or int(train_sample) >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=int(train_sample), replace=False))


def build_index(x: Any, factory: str = "Flat", metric: str = "ip",
                train_sample: int | None = None, seed: int = 0, nprobe: int | None = None,
                hnsw_ef_search: int | None = None, ids: Any = None,
                name: str = "features") -> faiss.Index:
    """Build a FAISS index from ``x`` [N, D] with ``faiss.index_factory(D, factory, metric)``.

    Untrained indexes (IVF, PQ) are trained on ``train_sample`` rows drawn with ``seed``
    (all rows when None or >= N). Vectors are added in chunks, with ``ids`` when given
    (an index that cannot store ids is wrapped in ``IndexIDMap2``). ``name`` (where ``x``
    comes from) prefixes the errors about unusable vectors.
    """
    x = check_features(x, name=name, dim=None, normalized=_metric(metric) == faiss.METRIC_INNER_PRODUCT)
    n, d = x.shape
    index = _make_index(d, factory, metric)
    if not index.is_trained:
        sel = training_rows(n, train_sample, seed)
        _train(index, x if sel is None else x[sel], factory, seed)
    if ids is not None:
        index = _with_ids(index)
        _add(index, x, _ids_array(ids, n))
    else:
        _add(index, x)
    set_search_params(index, nprobe, hnsw_ef_search)
    return index


# ---------------------------------------------------------------------------- sharded build

def train_empty_index(sample: Any, factory: str = "Flat", metric: str = "ip",
                      seed: int = 0, out_path: str | os.PathLike | None = None,
                      name: str = "training sample") -> faiss.Index:
    """Train an index on ``sample`` and return it empty, ready for ``add_shard``.

    Index types that cannot store ids themselves (Flat, PQ, HNSW) are wrapped in
    ``IndexIDMap2`` so that every shard adds its vectors under global ids. When
    ``out_path`` is given the empty index is also written there atomically.
    """
    sample = check_features(sample, name=name,
                            normalized=_metric(metric) == faiss.METRIC_INNER_PRODUCT)
    index = _make_index(sample.shape[1], factory, metric)
    if "HNSW" in type(index).__name__ or ("HNSW" in factory.upper() and _ivf(index) is None):
        raise ConfigError(f"sharded builds need mergeable indexes (Flat, PQ, SQ, IVF*); "
                          f"{factory!r} (HNSW) cannot be merged; build it in one go")
    _train(index, sample, factory, seed)
    index = _with_ids(index)
    if out_path is not None:
        write_index(index, out_path)
    return index


def _read_index(path: str | os.PathLike, what: str = "index", mmap: bool = False,
                ondisk_same_dir: bool = False) -> faiss.Index:
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
        raise DataError(f"{what} file {path} is not a readable FAISS index: "
                        f"{_faiss_msg(e)}") from None


def write_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write ``index`` to the file ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return path


def add_shard(empty_index_path: str | os.PathLike | faiss.Index, x: Any, ids: Any,
              out_path: str | os.PathLike | None = None) -> faiss.Index:
    """Load the trained empty index, add ``x`` under int64 global ``ids``, return it.

    When ``out_path`` is given the shard index is written there atomically (one file per
    shard job, later combined with ``merge_shards``).
    """
    if isinstance(empty_index_path, faiss.Index):
        index = faiss.clone_index(empty_index_path)
    else:
        index = _read_index(empty_index_path, "empty trained index")
    if index.ntotal:
        raise DataError(f"{empty_index_path}: expected an empty trained index, it holds "
                        f"{index.ntotal} vectors")
    x = check_features(x, name="shard features", dim=index.d,
                       normalized=index.metric_type == faiss.METRIC_INNER_PRODUCT)
    index = _with_ids(index)
    _add(index, x, _ids_array(ids, x.shape[0]))
    if out_path is not None:
        write_index(index, out_path)
    return index


def merge_shards(paths: Sequence[str | os.PathLike | faiss.Index],
                 empty_index_path: str | os.PathLike | None = None,
                 ivfdata_path: str | os.PathLike | None = None) -> faiss.Index:
    """Combine shard indexes (from ``add_shard``) into one index holding all their ids.

    In memory (default): ``merge_from`` of every shard into the first one, which works for
    IVF (inverted lists are concatenated) and for ``IndexIDMap2``-wrapped flat codes.
    On disk (IVF only; ``ivfdata_path`` and ``empty_index_path`` given): FAISS's
    ``merge_ondisk`` memory-maps each shard and writes the merged inverted lists to
    ``ivfdata_path``, so the total may exceed RAM; the returned index refers to that file.
    """
    paths = list(paths)
    if not paths:
        raise DataError("merge_shards: no shard indexes given")
    if ivfdata_path is not None:
        from faiss.contrib.ondisk import merge_ondisk

        if empty_index_path is None:
            raise ConfigError("on-disk merge needs empty_index_path (the trained empty index)")
        for p in paths:
            if isinstance(p, faiss.Index):
                raise ConfigError("on-disk merge needs shard file paths, not index objects")
            if not Path(p).is_file():
                raise DataError(f"shard index file not found: {p}")
        index = _read_index(empty_index_path, "empty trained index")
        if _ivf(index) is None:
            raise ConfigError("on-disk merge works for IVF indexes only; leave ivfdata_path unset")
        Path(ivfdata_path).parent.mkdir(parents=True, exist_ok=True)
        merge_ondisk(index, [str(p) for p in paths], str(ivfdata_path))
        return index

    def load(p):
        return faiss.clone_index(p) if isinstance(p, faiss.Index) else _read_index(p, "shard index")

    index = load(paths[0])
    for p in paths[1:]:
        other = load(p)
        if (other.d, other.metric_type, type(other)) != (index.d, index.metric_type, type(index)):
            raise DataError(
                f"shard {p} does not match the first shard ({type(other).__name__}, "
                f"D={other.d}, metric {_METRIC_NAMES.get(other.metric_type, other.metric_type)} vs "
                f"{type(index).__name__}, D={index.d}, "
                f"metric {_METRIC_NAMES.get(index.metric_type, index.metric_type)})")
        try:
            index.merge_from(other, 0)  # add_id=0: keep the shard's own (global) ids
        except RuntimeError as e:
            raise DataError(f"cannot merge shard {p}: {_faiss_msg(e)}") from None
    return index


# ---------------------------------------------------------------------------- save / load

def _factory_of(index: faiss.Index) -> str:
    """A factory-like description of common index types (callers should pass the real one)."""
    ix = faiss.downcast_index(index)  # non-owning view: `index` must stay referenced
    if isinstance(ix, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return "IDMap2," + _factory_of(ix.index)
    if isinstance(ix, faiss.IndexFlat):
        return "Flat"
    if isinstance(ix, faiss.IndexHNSWFlat):
        return f"HNSW{ix.hnsw.nb_neighbors(1)}"
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
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    return Path(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None


def _check_ivfdata(folder: Path, index_file: Path, recorded: dict) -> Path:
    """The on-disk inverted lists ``index_info.json`` records, checked to be the very file the
    index was built with before FAISS maps it (another file there would crash on access)."""
    path = folder / recorded["path"]  # relative: beside the index; absolute when built elsewhere
    if not path.is_file():
        raise DataError(f"{path}: not found (the on-disk inverted lists of {index_file})")
    now = file_stamp(path)
    if now != {k: recorded.get(k) for k in now}:
        raise DataError(f"{path} is not the inverted-lists file {index_file} was built with "
                        f"({now['size']} bytes, recorded {recorded.get('size')}); rebuild the index")
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
    ivfdata = (info or {}).get("ivfdata")
    if ivfdata:
        _check_ivfdata(folder, index_file, ivfdata)
    index = _read_index(index_file, "index", mmap=mmap,
                        ondisk_same_dir=bool(ivfdata) and not Path(ivfdata["path"]).is_absolute())
    if info is not None:
        if int(info.get("ntotal", index.ntotal)) != index.ntotal or \
                int(info.get("dim", index.d)) != index.d:
            raise DataError(f"{info_file} (ntotal={info.get('ntotal')}, dim={info.get('dim')}) does "
                            f"not describe {index_file} (ntotal={index.ntotal}, dim={index.d})")
    else:
        warnings.warn(f"{info_file} missing; index metadata derived from the index", stacklevel=2)
        info = _describe(index)
    return index, info


# ---------------------------------------------------------------------------- search

@contextlib.contextmanager
def _flat_blocks(database_bs: int | None = FLAT_BLAS_DATABASE_BS):
    """Temporarily set FAISS's BLAS block size for exact search (a process-wide global)."""
    if not database_bs:
        yield
        return
    old = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = int(database_bs)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = old


def search(index: faiss.Index, queries: Any, k: int, info: dict | None = None,
           batch_size: int = SEARCH_BATCH, feature: str | None = None, name: str = "queries"
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours of ``queries``: ``(scores [Q, k] float32, ids [Q, k] int64)``.

    Scores are inner products (cosine) for metric ip, squared L2 distances for l2; rows
    are sorted best first; missing results (k > ntotal) have id -1. When both
    ``info["feature"]`` and ``feature`` are given they must agree. ``name`` (where the
    queries come from) is used in errors.
    """
    k = check_positive(k, "k")
    check_positive(batch_size, "batch_size")
    if info and feature is not None and info.get("feature") not in (None, feature):
        raise DataError(f"queries are '{feature}' features but the index was built from "
                        f"'{info['feature']}' features; embed both with the same descriptor")
    shape = getattr(queries, "shape", None)
    if shape is not None and len(shape) == 2 and shape[1] != index.d:
        raise DataError(f"dimension mismatch: index built with D={index.d}, "
                        f"{name} have D={shape[1]}")
    q = check_features(queries, name=name, dim=index.d,
                       normalized=index.metric_type == faiss.METRIC_INNER_PRODUCT)
    if index.ntotal == 0:
        raise DataError("the index is empty (ntotal=0)")
    if k > index.ntotal:
        LOG.warning("k=%d but the index holds %d vectors: the last %d neighbours of each query are "
                    "missing (id -1)", k, index.ntotal, k - index.ntotal)
    nq = q.shape[0]
    scores = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    with _flat_blocks():
        for s in range(0, nq, int(batch_size)):
            d_, i_ = index.search(q[s:s + int(batch_size)], k)
            scores[s:s + len(d_)] = d_
            ids[s:s + len(i_)] = i_
    return scores, ids


def recall_at_k(approx_ids: Any, exact_ids: Any, k: int = 1) -> float:
    """Share of queries whose exact nearest neighbour (``exact_ids[:, 0]``) is among the
    first ``k`` approximate results (FAISS's "1-recall@k")."""
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise DataError(f"recall: id arrays must be [Q, k] with the same Q, got "
                        f"{a.shape} and {e.shape}")
    if a.shape[1] < k:
        raise ConfigError(f"recall@{k} needs at least {k} approximate results per query, "
                          f"got {a.shape[1]}")
    if a.shape[0] == 0:
        raise DataError("recall: no queries")
    return float((a[:, :k] == e[:, :1]).any(axis=1).mean())


def measure_recall(index: faiss.Index, xb: Any, queries: Any, k: int = 1,
                   ids: Any = None) -> dict[str, Any]:
    """Recall of ``index`` against an exact Flat index on ``xb`` (same metric).

    ``ids`` are the ids ``index`` stores for the rows of ``xb`` (default: row numbers).
    Returns ``{"recall@1", "recall@k", "k", "n_queries"}`` for index_info.json.
    """
    normalized = index.metric_type == faiss.METRIC_INNER_PRODUCT
    xb = check_features(xb, name="database features", dim=index.d, normalized=normalized)
    q = check_features(queries, name="queries", dim=index.d, normalized=normalized)
    exact = faiss.IndexFlat(index.d, index.metric_type)
    _add(exact, xb)
    with _flat_blocks():
        _, e_ids = exact.search(q, 1)
    if ids is not None:
        id_map = _ids_array(ids, xb.shape[0])
        e_ids = np.where(e_ids >= 0, id_map[np.clip(e_ids, 0, None)], -1)
    _, a_ids = index.search(q, max(1, int(k)))
    out = {"recall@1": recall_at_k(a_ids, e_ids, 1), "k": int(k), "n_queries": int(q.shape[0])}
    out[f"recall@{int(k)}"] = recall_at_k(a_ids, e_ids, int(k))
    return out


def _iter_shards(shards: Any) -> Iterable[tuple[str, np.ndarray]]:
    if isinstance(shards, (str, os.PathLike, np.ndarray)) or hasattr(shards, "detach"):
        shards = [shards]
    for i, s in enumerate(shards):
        if isinstance(s, (str, os.PathLike)):
            p = Path(s)
            if not p.is_file():
                raise DataError(f"feature shard not found: {p}")
            try:
                arr = np.load(p, mmap_mode="r")
            except ValueError as e:
                raise DataError(f"feature shard {p} is not a .npy array: {e}") from None
            yield str(p), arr
        else:  # a memory map keeps its file's name for the errors
            yield getattr(s, "filename", None) or f"shard {i}", s


def streaming_search(shards: Any, queries: Any, k: int, metric: str = "ip",
                     chunk: int = STREAM_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over a database stored as ``.npy`` shards (or arrays), memory-bounded.

    Each shard is memory-mapped and scanned ``chunk`` rows at a time with FAISS's
    brute-force ``knn``; a running heap keeps the best ``k`` per query. Global ids are the
    row numbers of the concatenated shards (shard offset + row). Same output as an exact
    Flat index over the concatenation (up to the order of tied scores).
    """
    k = check_positive(k, "k")
    check_positive(chunk, "chunk")
    mt = _metric(metric)
    normalized = mt == faiss.METRIC_INNER_PRODUCT
    q = check_features(queries, name="queries", normalized=normalized)
    heap = faiss.ResultHeap(q.shape[0], k, keep_max=normalized)
    offset = 0
    for name, arr in _iter_shards(shards):
        if getattr(arr, "ndim", 0) != 2:
            raise DataError(f"{name}: expected a 2-D array [N, D], got shape "
                            f"{tuple(getattr(arr, 'shape', ()))}")
        if arr.shape[1] != q.shape[1]:
            raise DataError(f"dimension mismatch: {name} has D={arr.shape[1]}, "
                            f"queries have D={q.shape[1]}")
        for s in range(0, arr.shape[0], int(chunk)):
            c = check_features(arr[s:s + int(chunk)], name=f"{name} rows {s}..", normalized=normalized)
            kk = min(k, c.shape[0])
            with _flat_blocks():
                d_, i_ = faiss.knn(q, c, kk, metric=mt)
            heap.add_result(d_, i_ + (offset + s))
        offset += arr.shape[0]
    if offset == 0:
        raise DataError("streaming_search: the database shards are empty")
    heap.finalize()
    return heap.D, heap.I
