"""``diffmem search``: top-k training-set neighbours of query images (usually generations).

Reads a query embed run and an index run (whose info names the embed run of the reference
set), or with ``stream_dir`` the reference embed run itself, searched exactly by streaming
its memory-mapped feature parts through a running top-k heap (memory bounded by one part:
for reference sets larger than RAM), and writes the matches table
(:mod:`diffmem.index.matches`: ``query_id, rank, ref_id, ref_file, score, raw_score,
feature``). With ``normalisation.background_dir`` (an embed run of unrelated images)
scores are SSCD-normalised: score - beta x the mean similarity of the query to its k
nearest background images.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from diffmem.config import hydra_app
from diffmem.errors import ConfigError
from diffmem.features.store import FeatureStore
from diffmem.index.matches import find_matches, input_digests, write_matches
from diffmem.runs import check_claim, claim, finish, is_done, require


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
          "background_dir": norm.background_dir, "beta": norm.beta,
          "inputs": input_digests(cfg.queries_dir, cfg.index_dir, cfg.stream_dir, norm.background_dir)}
    if check_claim(cfg.run_dir, fp) and is_done(cfg.run_dir):
        return Path(cfg.run_dir)
    matches = find_matches(cfg.index_dir, cfg.queries_dir, cfg.k, norm.background_dir, norm.beta, norm.k,
                           stream_dir=cfg.stream_dir)
    run_dir = claim(cfg.run_dir, fp)
    write_matches(run_dir, matches)
    warning = FeatureStore(cfg.queries_dir).warning()  # a random CLIP: the matches mean nothing
    return finish(run_dir, cfg, {"rows": len(matches)}, **({"warning": warning} if warning else {}))


main = hydra_app("search", run)

if __name__ == "__main__":
    main()
