"""Indexes that do not fit in one job, FAISS's "indexes that do not fit in RAM" recipe:
:func:`train_empty_index` once, :func:`add_shard` in parallel jobs, :func:`merge_shards` in
memory or on disk (IVF inverted lists merged into one ``.ivfdata`` file that may exceed RAM).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss

from diffmem.errors import ConfigError, DataError
from diffmem.index.build import (
    _METRIC_NAMES,
    _add,
    _faiss_msg,
    _ids_array,
    _ivf,
    _make_index,
    _metric,
    _train,
    _with_ids,
    check_features,
)
from diffmem.index.files import _read_index, write_index


def train_empty_index(
    sample: Any,
    factory: str = "Flat",
    metric: str = "ip",
    seed: int = 0,
    out_path: str | os.PathLike | None = None,
    name: str = "training sample",
) -> faiss.Index:
    """Train an index on ``sample`` and return it empty, ready for ``add_shard``.

    Index types that cannot store ids themselves (Flat, PQ, HNSW) are wrapped in
    ``IndexIDMap2`` so that every shard adds its vectors under global ids. When
    ``out_path`` is given the empty index is also written there atomically.
    """
    sample = check_features(sample, name=name, normalized=_metric(metric) == faiss.METRIC_INNER_PRODUCT)
    index = _make_index(sample.shape[1], factory, metric)
    if "HNSW" in type(index).__name__ or ("HNSW" in factory.upper() and _ivf(index) is None):
        raise ConfigError(
            f"sharded builds need mergeable indexes (Flat, PQ, SQ, IVF*); "
            f"{factory!r} (HNSW) cannot be merged; build it in one go"
        )
    _train(index, sample, factory, seed)
    index = _with_ids(index)
    if out_path is not None:
        write_index(index, out_path)
    return index


def add_shard(
    empty_index_path: str | os.PathLike | faiss.Index, x: Any, ids: Any, out_path: str | os.PathLike | None = None
) -> faiss.Index:
    """Load the trained empty index, add ``x`` under int64 global ``ids``, return it.

    When ``out_path`` is given the shard index is written there atomically (one file per
    shard job, later combined with ``merge_shards``).
    """
    if isinstance(empty_index_path, faiss.Index):
        index = faiss.clone_index(empty_index_path)
    else:
        index = _read_index(empty_index_path, "empty trained index")
    if index.ntotal:
        raise DataError(f"{empty_index_path}: expected an empty trained index, it holds {index.ntotal} vectors")
    x = check_features(
        x, name="shard features", dim=index.d, normalized=index.metric_type == faiss.METRIC_INNER_PRODUCT
    )
    index = _with_ids(index)
    _add(index, x, _ids_array(ids, x.shape[0]))
    if out_path is not None:
        write_index(index, out_path)
    return index


def merge_shards(
    paths: Sequence[str | os.PathLike | faiss.Index],
    empty_index_path: str | os.PathLike | None = None,
    ivfdata_path: str | os.PathLike | None = None,
) -> faiss.Index:
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

    def load(p: faiss.Index | str | os.PathLike[str]) -> faiss.Index:
        return faiss.clone_index(p) if isinstance(p, faiss.Index) else _read_index(p, "shard index")

    index = load(paths[0])
    for p in paths[1:]:
        other = load(p)
        if (other.d, other.metric_type, type(other)) != (index.d, index.metric_type, type(index)):
            raise DataError(
                f"shard {p} does not match the first shard ({type(other).__name__}, "
                f"D={other.d}, metric {_METRIC_NAMES.get(other.metric_type, other.metric_type)} vs "
                f"{type(index).__name__}, D={index.d}, "
                f"metric {_METRIC_NAMES.get(index.metric_type, index.metric_type)})"
            )
        try:
            index.merge_from(other, 0)  # add_id=0: keep the shard's own (global) ids
        except RuntimeError as e:
            raise DataError(f"cannot merge shard {p}: {_faiss_msg(e)}") from None
    return index
