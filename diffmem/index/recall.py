"""The recall of an approximate index against the exact one (FAISS's "1-recall@k"), as
recorded in ``index_info.json``."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from diffmem.errors import ConfigError, DataError
from diffmem.index.build import _add, _ids_array, check_features
from diffmem.index.search import _flat_blocks


def recall_at_k(approx_ids: Any, exact_ids: Any, k: int = 1) -> float:
    """Share of queries whose exact nearest neighbour (``exact_ids[:, 0]``) is among the
    first ``k`` approximate results (FAISS's "1-recall@k")."""
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise DataError(f"recall: id arrays must be [Q, k] with the same Q, got {a.shape} and {e.shape}")
    if a.shape[1] < k:
        raise ConfigError(f"recall@{k} needs at least {k} approximate results per query, got {a.shape[1]}")
    if a.shape[0] == 0:
        raise DataError("recall: no queries")
    return float((a[:, :k] == e[:, :1]).any(axis=1).mean())


def measure_recall(index: faiss.Index, xb: Any, queries: Any, k: int = 1, ids: Any = None) -> dict[str, Any]:
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
