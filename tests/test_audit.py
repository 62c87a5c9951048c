"""The audit job end to end on the tiny pipeline, and its scoring against hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

import diffmem
from diffmem.metrics.audit import score_generations, score_prompts, summarise
from tests.conftest import SMALL_DATA


def test_scoring_hand_made_case():
    samples = pd.DataFrame(
        {
            "sample_id": ["a0", "a1", "b0", "b1"],
            "prompt_id": [0, 0, 1, 1],
            "caption": ["canary", "canary", "plain", "plain"],
            "kind": ["canary", "canary", "ordinary", "ordinary"],
            "group": ["g1", "g1", "", ""],
            "dup_count": [16, 16, 1, 1],
        }
    )
    matches = pd.DataFrame(
        {
            "query_id": ["a0", "a1", "b0", "b1", "a0"],
            "rank": [0, 0, 0, 0, 1],
            "ref_id": ["r1", "r2", "r3", "r1", "r3"],
            "ref_file": ["f1", "f2", "f3", "f1", "f3"],
            "score": [0.99, 0.6, 0.3, 0.2, 0.1],
        }
    )
    refs = pd.DataFrame({"item_id": ["r1", "r2", "r3"], "group": ["g1", "g2", ""]})
    gens = score_generations(samples, matches, refs, threshold=0.9)
    assert gens["top1_score"].tolist() == [0.99, 0.6, 0.3, 0.2]
    assert gens["replicated"].tolist() == [True, False, False, False]
    assert gens["correct_match"].iloc[:2].tolist() == [True, False] and gens["correct_match"].iloc[2:].isna().all()
    prompts = score_prompts(gens, threshold=0.9, dcr_threshold=0.5)
    assert prompts["prompt_id"].tolist() == [0, 1]  # ranked by max score
    # score bands, named apart from NeMo's VM/TM classes (were "VM", "N")
    assert prompts["score_band"].tolist() == ["above", "below"] and prompts["replicated_share"].tolist() == [0.5, 0.0]
    assert prompts["correct_match_share_of_replicated"].iloc[0] == 1.0 and prompts["n_replicated"].tolist() == [1, 0]
    m = summarise(gens, prompts, pd.DataFrame({"top1_score": [0.1, 0.2]}), 0.9, 0.5)
    assert m["replication_rate"] == 0.25 and m["memorisation_rate"] == 1.0
    assert m["memorisation_rate_prompts"] == 1  # its denominator
    assert abs(m["dcr"]["mean"] - np.mean([0.99, 0.6, 0.3, 0.2])) < 1e-9
    by = {r["dup_count"]: r for r in m["by_dup_count"]}
    assert by[16]["flagged_share"] == 1.0 and by[16]["correct_match_share_of_replicated"] == 1.0
    assert by[1]["flagged_share"] == 0.0


def test_audit_end_to_end_tiny(tiny_pipe_dir):
    args = [
        "model=local",
        f"model.path={tiny_pipe_dir}",
        "model.num_inference_steps=2",
        "n_per_prompt=2",
        "prompts.n_ordinary=2",
        "prompts.n_heldout=2",
        "features.extractor.size=8",
        *SMALL_DATA,
    ]
    run_dir = diffmem.run("audit", args)
    res = diffmem.load_run(run_dir)
    gens, prompts = res.table("generations"), res.table("prompts")
    assert res.done and len(gens) == 2 * len(prompts)
    assert gens["top1_score"].between(-1, 1.0001).all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["threshold"] == 0.93 and "versions" in metrics["provenance"]
    assert metrics["dcr"]["baseline_n"] == 8  # the held-out real images of SMALL_DATA
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html
    stamp = (run_dir / "metrics.json").stat().st_mtime_ns
    diffmem.run("audit", args)  # finished: a no-op
    assert (run_dir / "metrics.json").stat().st_mtime_ns == stamp


def test_refused_audit_creates_nothing(tmp_path):
    import pytest

    from diffmem.errors import DataError

    out = tmp_path / "audit-run"
    with pytest.raises(DataError, match="cannot load pipeline"):
        diffmem.run("audit", ["model=local", f"model.path={tmp_path}/missing", f"run_dir={out}", *SMALL_DATA])
    assert not out.exists()


def test_shipped_testbed_audit_flags_the_duplicated_canaries(shipped_audit_outputs):
    """The audit's headline claim on the shipped model: duplicated canaries flagged with the
    right training image, ordinary and held-out prompts not flagged."""
    metrics = json.loads((shipped_audit_outputs / "audit" / "testbed" / "metrics.json").read_text())
    by = {(r["kind"], r["dup_count"]): r for r in metrics["by_dup_count"]}
    assert by[("canary", 64)]["flagged_share"] >= 0.75
    assert by[("canary", 16)]["flagged_share"] >= 0.5
    for dup in (16, 64):
        assert by[("canary", dup)]["correct_match_share_of_replicated"] >= 0.95
    assert by[("ordinary", 1)]["flagged_share"] == 0 and by[("heldout", 0)]["flagged_share"] == 0
    assert metrics["dcr"]["baseline_n"] == 256
