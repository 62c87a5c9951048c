"""Top-k search: through an index in query batches (:func:`search`), or exact and
memory-bounded without one (:func:`streaming_search`: ``.npy`` shards memory-mapped and
scanned in chunks with a running top-k heap).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from diffmem.checks import check_positive
from diffmem.errors import DataError
from diffmem.index.build import _metric, check_features

LOG = logging.getLogger(__name__)

SEARCH_BATCH = 16384  # queries per search() call
STREAM_CHUNK = 262144  # database rows per streaming step
# Database rows per BLAS block in exact (Flat / knn) search. FAISS's default (1024) makes
# many small sgemm calls + OpenMP barriers; 8192 was 1.3-2x faster on 2 cores (see
# benchmarks/bench_search.py) at the cost of a query_bs x 8192 float32 buffer (128 MB).
FLAT_BLAS_DATABASE_BS = 8192


@contextlib.contextmanager
def _flat_blocks(database_bs: int | None = FLAT_BLAS_DATABASE_BS) -> Iterator[None]:
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


def search(
    index: faiss.Index,
    queries: Any,
    k: int,
    info: dict | None = None,
    batch_size: int = SEARCH_BATCH,
    feature: str | None = None,
    name: str = "queries",
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
        raise DataError(
            f"queries are '{feature}' features but the index was built from "
            f"'{info['feature']}' features; embed both with the same descriptor"
        )
    shape = getattr(queries, "shape", None)
    if shape is not None and len(shape) == 2 and shape[1] != index.d:
        raise DataError(f"dimension mismatch: index built with D={index.d}, {name} have D={shape[1]}")
    q = check_features(queries, name=name, dim=index.d, normalized=index.metric_type == faiss.METRIC_INNER_PRODUCT)
    if index.ntotal == 0:
        raise DataError("the index is empty (ntotal=0)")
    if k > index.ntotal:
        LOG.warning(
            "k=%d but the index holds %d vectors: the last %d neighbours of each query are missing (id -1)",
            k,
            index.ntotal,
            k - index.ntotal,
        )
    nq = q.shape[0]
    scores = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    with _flat_blocks():
        for s in range(0, nq, int(batch_size)):
            d_, i_ = index.search(q[s : s + int(batch_size)], k)
            scores[s : s + len(d_)] = d_
            ids[s : s + len(i_)] = i_
    return scores, ids


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


def streaming_search(
    shards: Any, queries: Any, k: int, metric: str = "ip", chunk: int = STREAM_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
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
            raise DataError(f"{name}: expected a 2-D array [N, D], got shape {tuple(getattr(arr, 'shape', ()))}")
        if arr.shape[1] != q.shape[1]:
            raise DataError(f"dimension mismatch: {name} has D={arr.shape[1]}, queries have D={q.shape[1]}")
        for s in range(0, arr.shape[0], int(chunk)):
            c = check_features(arr[s : s + int(chunk)], name=f"{name} rows {s}..", normalized=normalized)
            kk = min(k, c.shape[0])
            with _flat_blocks():
                d_, i_ = faiss.knn(q, c, kk, metric=mt)
            heap.add_result(d_, i_ + (offset + s))
        offset += arr.shape[0]
    if offset == 0:
        raise DataError("streaming_search: the database shards are empty")
    heap.finalize()
    return heap.D, heap.I
