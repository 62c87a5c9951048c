"""The detection benchmark's pooling over data seeds (``benchmarks/bench_detect.py --extra``):
pairs within a model, intervals that narrow with more models, and checked ``--extra`` specs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diffmem.metrics.detection import detection_metrics, roc_auc


def load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_detect.py"
    spec = importlib.util.spec_from_file_location("bench_detect", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def scores_table(seed: int, shift: float = 0.0) -> pd.DataFrame:
    """8 memorised, 8 hard negatives and 60 negatives, overlapping, all scores moved by ``shift``."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "score": shift + np.r_[rng.normal(2, 1, 8), rng.normal(1.5, 1, 8), rng.normal(0, 1, 60)],
            "label": np.r_[np.ones(8), np.full(8, np.nan), np.zeros(60)],
            "hard_negative": np.r_[np.zeros(8, bool), np.ones(8, bool), np.zeros(60, bool)],
            "evals_per_prompt": 10.0,
            "seconds_per_prompt": 0.1,
        }
    )


def test_pooling_one_model_is_its_own_metrics():
    bench = load_bench()
    table = scores_table(0)
    pooled, alone = bench.pooled_metrics([table]), bench.suite_metrics(table)
    for key in ("roc_auc", "roc_auc_ci", "tpr_at_fpr", "tpr_at_fpr_ci", "hard_roc_auc", "hard_roc_auc_ci"):
        assert pooled[key] == pytest.approx(alone[key]), key
    assert (pooled["models"], pooled["n_pos"], pooled["n_neg"], pooled["n_hard"]) == (1, 8, 60, 8)


def test_pooling_pairs_prompts_within_each_model():
    bench = load_bench()
    a, b = scores_table(0), scores_table(1, shift=100.0)  # model b scores everything far higher
    pooled = bench.pooled_metrics([a, b])
    per_model = [roc_auc(t.score[t.label.notna()], t.label.dropna()) for t in (a, b)]
    assert pooled["roc_auc"] == pytest.approx(np.mean(per_model))  # equal pairs per model
    both = pd.concat([a, b])
    naive = roc_auc(both.score[both.label.notna()], both.label.dropna())
    assert abs(naive - pooled["roc_auc"]) > 0.1  # pooling raw scores across models would mix scales
    tprs = [detection_metrics(t.score[t.label.notna()], t.label.dropna())["tpr_at_fpr"] for t in (a, b)]
    assert pooled["tpr_at_fpr"] == pytest.approx(np.mean(tprs)) and pooled["n_hard"] == 16
    # four models' worth of prompts: the hard-negative interval about halves (width ~ 1 / sqrt(n))
    models = [a, b, scores_table(2), scores_table(3)]
    one = np.mean([np.diff(bench.pooled_metrics([t])["hard_roc_auc_ci"])[0] for t in models])
    four = np.diff(bench.pooled_metrics(models)["hard_roc_auc_ci"])[0]
    assert 0.35 < four / one < 0.7
    lines = bench.markdown_pooled({"testbed": {"x": pooled}}).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| testbed | `x` | 2 | 16 / 120 / 16 |")


def test_extra_specs_are_checked(tiny_pipe_dir):
    bench = load_bench()
    testbed, path, seed = bench.parse_extra(f"testbed:{tiny_pipe_dir}:3")
    assert (testbed, path, seed) == ("testbed", Path(tiny_pipe_dir).resolve(), 3)
    with pytest.raises(SystemExit, match="expected"):
        bench.parse_extra(f"flat:{tiny_pipe_dir}:3")
    with pytest.raises(SystemExit, match="expected"):
        bench.parse_extra(f"testbed:{tiny_pipe_dir}")
    with pytest.raises(SystemExit, match="model_index.json"):
        bench.parse_extra(f"testbed_photo:{tiny_pipe_dir.parent}:1")
