"""The matches table: the top-k reference neighbours of each query vector, and its file.

``matches.parquet``: one row per (query, rank) with ``query_id, rank, ref_index, score,
raw_score, feature`` and, when the reference embed run is known, ``ref_id, ref_file``.
``score`` is ``raw_score`` (the similarity) or, with a background set, its SSCD-normalised
form: score - beta x the mean similarity of the query to its k nearest background images.
Written by the search stage and by audit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from diffmem.checks import check_positive
from diffmem.errors import DataError
from diffmem.features.store import FeatureStore
from diffmem.index.faiss_index import build_index, load_index, search, streaming_search
from diffmem.metrics import sscd_score_normalisation
from diffmem.runs import write_parquet

MATCHES = "matches.parquet"


def find_matches(index_dir: str | Path | None, queries_dir: str | Path, k: int,
                 background_dir: str | Path | None = None, beta: float = 1.0,
                 background_k: int = 10, stream_dir: str | Path | None = None) -> pd.DataFrame:
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
        index, info = load_index(index_dir)
    if info.get("feature") not in (None, qinfo["feature"]):
        raise DataError(f"{queries_dir} holds '{qinfo['feature']}' features but the reference "
                        f"{ref_dir} was built from '{info['feature']}' features; embed both "
                        "with the same descriptor")
    if index is None:
        scores, ids = streaming_search(parts, q, k)
    else:
        if q.shape[1] != index.d:
            raise DataError(f"dimension mismatch: {queries_dir} holds D={q.shape[1]} vectors but "
                            f"the index {index_dir} was built with D={index.d}")
        scores, ids = search(index, q, k, info=info, feature=qinfo["feature"], name=f"queries {queries_dir}")
    raw = scores.copy()
    if background_dir:
        bx, _, binfo = FeatureStore(background_dir).load()
        bg_scores, _ = search(build_index(bx, name=f"background {background_dir}"), q, background_k,
                              info={"feature": binfo["feature"]}, feature=qinfo["feature"],
                              name=f"queries {queries_dir}")
        scores = sscd_score_normalisation(scores, bg_scores, beta=beta, k=background_k).astype(np.float32)
    refs = None
    if "features_dir" in info:
        store = FeatureStore(info["features_dir"])
        if not store.ids_path.is_file():
            raise DataError(f"{store.ids_path}: not found (the reference embed run of {ref_dir} was moved or deleted)")
        refs = store.ids()
    nq = len(qids)
    out = pd.DataFrame({
        "query_id": np.repeat(qids["item_id"].to_numpy(), k),
        "rank": np.tile(np.arange(k), nq),
        "ref_index": ids.reshape(-1),
        "score": scores.reshape(-1),
        "raw_score": raw.reshape(-1),
        "feature": qinfo["feature"],
    })
    out = out[out["ref_index"] >= 0]
    if refs is not None:
        ref = refs.iloc[out["ref_index"].to_numpy()]
        out["ref_id"] = ref["item_id"].to_numpy()
        out["ref_file"] = ref["file"].to_numpy()
    return out.reset_index(drop=True)


def write_matches(run_dir: str | Path, matches: pd.DataFrame) -> Path:
    """Publish ``matches`` in ``run_dir`` (atomically)."""
    return write_parquet(Path(run_dir) / MATCHES, matches)
