"""``diffmem search``: top-k training-set neighbours of query images (usually generations).

Reads a query embed run and an index run (whose ``index_info.json`` names the embed run
of the reference set), or with ``stream_dir`` the reference embed run itself, searched
exactly by streaming its memory-mapped feature parts through a running top-k heap (memory
bounded by one part: for reference sets larger than RAM), and writes ``matches.parquet``: ``query_id, rank, ref_id,
ref_file, score, raw_score, feature``. With ``normalisation.background_dir`` (an embed
run of unrelated images) scores are SSCD-normalised: score - beta x the mean similarity
of the query to its k nearest background images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from diffmem.checks import check_positive
from diffmem.config import hydra_app
from diffmem.embed import feature_parts, load_features
from diffmem.errors import ConfigError, DataError
from diffmem.index.faiss_index import build_index, load_index, search, streaming_search
from diffmem.metrics import sscd_score_normalisation
from diffmem.runs import check_claim, claim, finish, is_done, read_json, require, write_parquet

MATCHES = "matches.parquet"


def find_matches(index_dir: str | Path | None, queries_dir: str | Path, k: int,
                 background_dir: str | Path | None = None, beta: float = 1.0,
                 background_k: int = 10, stream_dir: str | Path | None = None) -> pd.DataFrame:
    """The ``matches`` table of ``queries_dir``'s vectors against the index in ``index_dir``
    (or, with ``stream_dir``, against that embed run's parts, streamed)."""
    check_positive(k, "k")
    q, qids, qinfo = load_features(queries_dir)
    ref_dir = stream_dir or index_dir
    info = ({"feature": read_json(Path(stream_dir) / "info.json").get("feature"), "features_dir": str(stream_dir)}
            if stream_dir else None)
    index = None
    if info is None:
        index, info = load_index(index_dir)
    if info.get("feature") not in (None, qinfo["feature"]):
        raise DataError(f"{queries_dir} holds '{qinfo['feature']}' features but the reference "
                        f"{ref_dir} was built from '{info['feature']}' features; embed both "
                        "with the same descriptor")
    if index is None:
        scores, ids = streaming_search(feature_parts(stream_dir), q, k)
    else:
        if q.shape[1] != index.d:
            raise DataError(f"dimension mismatch: {queries_dir} holds D={q.shape[1]} vectors but "
                            f"the index {index_dir} was built with D={index.d}")
        scores, ids = search(index, q, k, info=info, feature=qinfo["feature"], name=f"queries {queries_dir}")
    raw = scores.copy()
    if background_dir:
        bx, _, binfo = load_features(background_dir)
        bg_scores, _ = search(build_index(bx, name=f"background {background_dir}"), q, background_k,
                              info={"feature": binfo["feature"]}, feature=qinfo["feature"],
                              name=f"queries {queries_dir}")
        scores = sscd_score_normalisation(scores, bg_scores, beta=beta, k=background_k).astype(np.float32)
    refs = None
    if "features_dir" in info:
        ref_ids = Path(info["features_dir"]) / "ids.parquet"
        if not ref_ids.is_file():
            raise DataError(f"{ref_ids}: not found (the reference embed run of {ref_dir} was moved or deleted)")
        refs = pd.read_parquet(ref_ids)
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


def run(cfg: DictConfig) -> Path:
    """Search per ``cfg``; the matches are computed before the run dir is claimed, so a
    refused run creates nothing."""
    if (cfg.get("index_dir") is None) == (cfg.get("stream_dir") is None):
        raise ConfigError("search needs exactly one of index_dir=<an index run> or stream_dir=<an embed run>")
    require(cfg, "queries_dir", hint="search needs queries_dir=<an embed run>")
    norm = cfg.normalisation
    ref = cfg.index_dir or cfg.stream_dir
    fp = {"index_dir" if cfg.index_dir else "stream_dir": str(Path(ref).resolve()),
          "queries_dir": str(Path(cfg.queries_dir).resolve()), "k": cfg.k,
          "background_dir": norm.background_dir, "beta": norm.beta}
    if check_claim(cfg.run_dir, fp) and is_done(cfg.run_dir):
        return Path(cfg.run_dir)
    matches = find_matches(cfg.index_dir, cfg.queries_dir, cfg.k, norm.background_dir, norm.beta, norm.k,
                           stream_dir=cfg.stream_dir)
    run_dir = claim(cfg.run_dir, fp)
    write_parquet(run_dir / MATCHES, matches)
    return finish(run_dir, cfg, {"rows": len(matches)})


main = hydra_app("search", run)

if __name__ == "__main__":
    main()
