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

from typing import Any

from omegaconf import DictConfig

from diffmem.config import hydra_app
from diffmem.errors import ConfigError
from diffmem.features.store import FeatureStore
from diffmem.index.matches import find_matches, input_digests, write_matches
from diffmem.runner import Job, Outcome, StageSpec
from diffmem.runs import require


def prepare(cfg: DictConfig) -> None:
    if (cfg.get("index_dir") is None) == (cfg.get("stream_dir") is None):
        raise ConfigError("search needs exactly one of index_dir=<an index run> or stream_dir=<an embed run>")
    require(cfg, "queries_dir", hint="search needs queries_dir=<an embed run>")


def inputs_digest(cfg: DictConfig, _ctx: Any) -> dict:
    """The upstream runs by content: one recomputed under the same path needs a new search."""
    norm = cfg.normalisation
    return {"inputs": input_digests(cfg.queries_dir, cfg.index_dir, cfg.stream_dir, norm.background_dir)}


def body(job: Job) -> Outcome:
    cfg, norm = job.cfg, job.cfg.normalisation
    matches = find_matches(
        cfg.index_dir, cfg.queries_dir, cfg.k, norm.background_dir, norm.beta, norm.k, stream_dir=cfg.stream_dir
    )
    write_matches(job.dir, matches)
    warning = FeatureStore(cfg.queries_dir).warning()  # a random CLIP: the matches mean nothing
    return Outcome({"rows": len(matches)}, {"warning": warning} if warning else {})


SPEC = StageSpec("search", body, prepare, extra=inputs_digest)
run = SPEC.run
main = hydra_app("search", run)

if __name__ == "__main__":
    main()
