"""The matches table: the top-k reference neighbours of each query vector, and its file.

``matches.parquet``: one row per (query, rank) with ``query_id, rank, ref_index, score,
raw_score, feature`` and, when the reference embed run is known, ``ref_id, ref_file``.
``score`` is ``raw_score`` (the similarity) or, with a background set, its SSCD-normalised
form: score - beta x the mean similarity of the query to its k nearest background images.
Written by the search stage and by audit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from diffmem.checks import check_positive
from diffmem.errors import DataError
from diffmem.features.store import FeatureStore
from diffmem.index.build import build_index
from diffmem.index.files import INDEX_FILE, INFO_FILE, load_index
from diffmem.index.search import search, streaming_search
from diffmem.metrics import sscd_score_normalisation
from diffmem.runs import file_stamp, read_json, write_parquet

if TYPE_CHECKING:
    import faiss

MATCHES = "matches.parquet"


def find_matches(
    index_dir: str | Path | None,
    queries_dir: str | Path,
    k: int,
    background_dir: str | Path | None = None,
    beta: float = 1.0,
    background_k: int = 10,
    stream_dir: str | Path | None = None,
) -> pd.DataFrame:
    """The matches of ``queries_dir``'s vectors against the index in ``index_dir`` (or, with
    ``stream_dir``, against that embed run's memory-mapped parts, streamed)."""
    check_positive(k, "k")
    q, qids, qinfo = FeatureStore(queries_dir).load()
    ref_dir = stream_dir or index_dir
    index = parts = None
    if stream_dir:
        parts, sinfo = FeatureStore(stream_dir).part_maps()
        info = {"feature": sinfo["feature"], "features_dir": str(stream_dir)}
    else:
        assert index_dir is not None  # callers give an index or a stream (search.py checks it)
        index, info = load_index(index_dir)
    if info.get("feature") not in (None, qinfo["feature"]):
        raise DataError(
            f"{queries_dir} holds '{qinfo['feature']}' features but the reference "
            f"{ref_dir} was built from '{info['feature']}' features; embed both "
            "with the same descriptor"
        )
    refs = None
    if "features_dir" in info:
        store = FeatureStore(info["features_dir"])
        if not store.ids_path.is_file():
            raise DataError(f"{store.ids_path}: not found (the reference embed run of {ref_dir} was moved or deleted)")
        refs = store.ids()
        if index is not None:
            _check_pairing(index_dir, index, info, store, len(refs))
    if index is None:
        scores, ids = streaming_search(parts, q, k)
    else:
        if q.shape[1] != index.d:
            raise DataError(
                f"dimension mismatch: {queries_dir} holds D={q.shape[1]} vectors but "
                f"the index {index_dir} was built with D={index.d}"
            )
        scores, ids = search(index, q, k, info=info, feature=qinfo["feature"], name=f"queries {queries_dir}")
    raw = scores.copy()
    if background_dir:
        bx, _, binfo = FeatureStore(background_dir).load()
        bg_scores, _ = search(
            build_index(bx, name=f"background {background_dir}"),
            q,
            background_k,
            info={"feature": binfo["feature"]},
            feature=qinfo["feature"],
            name=f"queries {queries_dir}",
        )
        scores = sscd_score_normalisation(scores, bg_scores, beta=beta, k=background_k).astype(np.float32)
    nq = len(qids)
    out = pd.DataFrame(
        {
            "query_id": np.repeat(qids["item_id"].to_numpy(), k),
            "rank": np.tile(np.arange(k), nq),
            "ref_index": ids.reshape(-1),
            "score": scores.reshape(-1),
            "raw_score": raw.reshape(-1),
            "feature": qinfo["feature"],
        }
    )
    out = out[out["ref_index"] >= 0]
    if refs is not None:
        ref = refs.iloc[out["ref_index"].to_numpy()]
        out["ref_id"] = ref["item_id"].to_numpy()
        out["ref_file"] = ref["file"].to_numpy()
    return out.reset_index(drop=True)


def input_digests(
    queries_dir: str | Path,
    index_dir: str | Path | None = None,
    stream_dir: str | Path | None = None,
    background_dir: str | Path | None = None,
) -> dict:
    """The contents a search reads, by digest (its run's fingerprint: a re-embedded or rebuilt
    input at the same path is a new search, not a finished one): the embed runs'
    :meth:`~FeatureStore.content_digest`, and the index's file and info without its provenance
    (an identical index rebuilt after damage is the same input)."""
    import hashlib
    import json

    runs = {"queries": queries_dir, "reference": stream_dir, "background": background_dir}
    out = {key: FeatureStore(d).content_digest() for key, d in runs.items() if d}
    info = Path(index_dir or "") / INFO_FILE
    if index_dir and info.is_file():
        meta = {k: v for k, v in read_json(info).items() if k not in ("config", "versions", "git", "date")}
        stamp = file_stamp(Path(index_dir) / INDEX_FILE) if (Path(index_dir) / INDEX_FILE).is_file() else None
        out["index"] = hashlib.sha256(json.dumps([meta, stamp], sort_keys=True, default=str).encode()).hexdigest()[:12]
    return out


def _check_pairing(
    index_dir: str | Path | None, index: faiss.Index, info: dict, store: FeatureStore, n_ids: int
) -> None:
    """Refuse an index that does not hold its reference embed run as that run is now (it was
    re-embedded, or changed, after the index was built): its rows would name the wrong images."""
    recorded = info.get("features_digest")  # indexes built before it was recorded: no digest
    if recorded is not None and recorded != (now := store.content_digest()):
        raise DataError(
            f"the index {index_dir} was built from other contents of {store.run_dir} "
            f"(digest {recorded} then, {now} now); rebuild the index"
        )
    dim = store.info().get("dim")
    if index.ntotal != n_ids or (dim is not None and int(dim) != index.d):
        raise DataError(
            f"the index {index_dir} (ntotal={index.ntotal}, D={index.d}) does not hold "
            f"its reference embed run {store.run_dir} ({n_ids} ids, D={dim}); rebuild the index"
        )


def write_matches(run_dir: str | Path, matches: pd.DataFrame) -> Path:
    """Publish ``matches`` in ``run_dir`` (atomically)."""
    return write_parquet(Path(run_dir) / MATCHES, matches)
