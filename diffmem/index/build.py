"""Building FAISS indexes over L2-normalised descriptors: input checks, ``index_factory``,
training, adding vectors under ids, search parameters.

The default is an exact ``Flat`` index with inner-product metric (cosine on L2-normalised
features), because memorisation scores need the exact top-k. Approximate indexes (IVF, PQ,
HNSW) are built from FAISS ``index_factory`` strings and carry their measured recall
(:mod:`diffmem.index.recall`) in ``index_info.json``. The sharded build is
:mod:`diffmem.index.sharded`, the files :mod:`diffmem.index.files`, search
:mod:`diffmem.index.search`.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, cast

import faiss
import numpy as np

from diffmem.checks import check_positive
from diffmem.errors import ConfigError, DataError

NORM_TOL = 1e-3
ADD_CHUNK = 65536  # rows per add() call
CHECK_CHUNK = 16384  # rows per validation step (bounds temporaries)
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per centroid

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_METRIC_NAMES = {v: k for k, v in _METRICS.items()}


def set_threads(threads: int | None) -> None:
    """FAISS's OpenMP threads (``threads``; null keeps its default, one per core)."""
    if threads:
        faiss.omp_set_num_threads(check_positive(threads, "threads"))


def _metric(metric: str | int) -> int:
    if isinstance(metric, (int, np.integer)) and int(metric) in _METRIC_NAMES:
        return int(metric)
    key = str(metric).lower()
    if key in ("inner_product", "cosine", "dot"):
        key = "ip"
    if key not in _METRICS:
        raise ConfigError(f"unknown index metric {metric!r}; use 'ip' (cosine on normalised features) or 'l2'")
    return _METRICS[key]


def _metric_name(metric: str | int) -> str:
    return _METRIC_NAMES[_metric(metric)]


def check_features(x: Any, name: str = "features", dim: int | None = None, normalized: bool = True) -> np.ndarray:
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
        c = x[s : s + CHECK_CHUNK]
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
            f"tolerance {NORM_TOL:g}); normalise them (x / ||x||) or use metric l2"
        )
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


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
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
        raise ConfigError(
            f"invalid FAISS factory string {factory!r} for D={dim} "
            f"(e.g. 'Flat', 'IVF1024,Flat', 'IVF1024,PQ16', 'HNSW32'): "
            f"{_faiss_msg(e)}"
        ) from None


def _check_train_size(index: faiss.Index, n_train: int, factory: str) -> None:
    ivf = _ivf(index)
    if ivf is not None:
        nlist = int(ivf.nlist)
        if n_train < nlist:
            raise ConfigError(
                f"index {factory!r} has nlist={nlist} lists but only {n_train} "
                f"training vectors; use a smaller nlist or more training data"
            )
        if n_train < MIN_POINTS_PER_CENTROID * nlist:
            warnings.warn(
                f"index {factory!r}: {n_train} training vectors for nlist={nlist} "
                f"(FAISS wants >= {MIN_POINTS_PER_CENTROID * nlist}); the "
                f"clustering may be poor",
                stacklevel=3,
            )


def _train(index: faiss.Index, sample: np.ndarray, factory: str, seed: int) -> None:
    if index.is_trained:
        return
    _check_train_size(index, sample.shape[0], factory)
    ivf = _ivf(index)
    if ivf is not None:
        ivf.cp.seed = int(seed)
        ivfpq = faiss.downcast_index(cast(faiss.Index, faiss.try_extract_index_ivf(index)))  # an IVF: found above
        if isinstance(ivfpq, faiss.IndexIVFPQ):
            # polysemous training (~4 s per sub-quantizer, whatever the data size) only
            # helps Hamming pre-filtering (polysemous_ht), which diffmem never enables
            ivfpq.do_polysemous_training = False  # type: ignore[attr-defined]  # a field faiss's stubs leave out
    try:
        index.train(sample)
    except RuntimeError as e:
        raise ConfigError(f"training index {factory!r} on {sample.shape[0]} vectors failed: {_faiss_msg(e)}") from None


def _supports_ids(index: faiss.Index) -> bool:
    return isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) or _ivf(index) is not None


def _with_ids(index: faiss.Index) -> faiss.Index:
    """Wrap an index that cannot store ids (Flat, PQ, HNSW) in an IndexIDMap2."""
    if _supports_ids(index):
        return index
    if index.ntotal:
        raise DataError("cannot attach ids to an index that already holds vectors without ids")
    wrapped = faiss.IndexIDMap2(index)
    wrapped.referenced_objects = [index]  # type: ignore[attr-defined]  # a Python attribute: keeps the inner index alive
    return wrapped


def _add(index: faiss.Index, x: np.ndarray, ids: np.ndarray | None = None) -> None:
    for s in range(0, x.shape[0], ADD_CHUNK):
        c = np.ascontiguousarray(x[s : s + ADD_CHUNK])
        if ids is None:
            index.add(c)
        else:
            index.add_with_ids(c, ids[s : s + ADD_CHUNK])


def set_search_params(index: faiss.Index, nprobe: int | None = None, hnsw_ef_search: int | None = None) -> faiss.Index:
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
            raise ConfigError(
                f"{key}={val} given but the index ({type(index).__name__}) is not an {kind} index; leave it unset"
            ) from None
    ivf = _ivf(index)
    if ivf is not None and nprobe is not None and int(nprobe) > ivf.nlist:
        warnings.warn(f"nprobe={nprobe} exceeds nlist={ivf.nlist}; every list is scanned", stacklevel=2)
    return index


def training_rows(n: int, train_sample: int | None, seed: int) -> np.ndarray | None:
    """The sorted rows an untrained index is trained on (None: all ``n``). The single and the
    sharded build both draw them here, so both train the same index."""
    check_positive(train_sample, "train_sample", optional=True)
    if train_sample is None or int(train_sample) >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=int(train_sample), replace=False))


def build_index(
    x: Any,
    factory: str = "Flat",
    metric: str = "ip",
    train_sample: int | None = None,
    seed: int = 0,
    nprobe: int | None = None,
    hnsw_ef_search: int | None = None,
    ids: Any = None,
    name: str = "features",
) -> faiss.Index:
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
