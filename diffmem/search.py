"""``diffmem search``: top-k training-set neighbours of query images (usually generations).

Reads a query embed run and an index run (whose ``index_info.json`` names the embed run
of the reference set) and writes ``matches.parquet``: ``query_id, rank, ref_id,
ref_file, score, raw_score, feature``. With ``normalisation.background_dir`` (an embed
run of unrelated images) scores are SSCD-normalised: score - beta x the mean similarity
of the query to its k nearest background images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from diffmem.config import hydra_app
from diffmem.embed import load_features
from diffmem.errors import ConfigError
from diffmem.index.faiss_index import build_index, load_index, search
from diffmem.metrics import sscd_score_normalisation
from diffmem.runs import claim, finish, is_done, write_parquet

MATCHES = "matches.parquet"


def find_matches(index_dir: str | Path, queries_dir: str | Path, k: int,
                 background_dir: str | Path | None = None, beta: float = 1.0,
                 background_k: int = 10) -> pd.DataFrame:
    """The ``matches`` table of ``queries_dir``'s vectors against the index in ``index_dir``."""
    if int(k) < 1:
        raise ConfigError(f"k must be >= 1 (got {k})")
    q, qids, qinfo = load_features(queries_dir)
    index, info = load_index(index_dir)
    scores, ids = search(index, q, k, info=info, feature=qinfo["feature"])
    raw = scores.copy()
    if background_dir:
        bx, _, binfo = load_features(background_dir)
        bg_scores, _ = search(build_index(bx), q, background_k, info={"feature": binfo["feature"]},
                              feature=qinfo["feature"])
        scores = sscd_score_normalisation(scores, bg_scores, beta=beta, k=background_k).astype(np.float32)
    refs = pd.read_parquet(Path(info["features_dir"]) / "ids.parquet") if "features_dir" in info else None
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
    if not cfg.index_dir or not cfg.queries_dir:
        raise ConfigError("search needs index_dir=<an index run> and queries_dir=<an embed run>")
    norm = cfg.normalisation
    run_dir = claim(cfg.run_dir, {"index_dir": str(Path(cfg.index_dir).resolve()),
                                  "queries_dir": str(Path(cfg.queries_dir).resolve()), "k": cfg.k,
                                  "background_dir": norm.background_dir, "beta": norm.beta})
    if is_done(run_dir):
        return run_dir
    matches = find_matches(cfg.index_dir, cfg.queries_dir, cfg.k, norm.background_dir, norm.beta, norm.k)
    write_parquet(run_dir / MATCHES, matches)
    return finish(run_dir, cfg, {"rows": len(matches)})


main = hydra_app("search", run)

if __name__ == "__main__":
    main()
