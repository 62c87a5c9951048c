"""The evaluate-mitigation stage on the tiny pipeline: one table with the three axes for plain
models and defence wrappers, utility relative to the reference, the Pareto figure from a
stored Optuna study, resume from parts, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import diffmem
from diffmem.errors import ConfigError, DataError
from tests.conftest import SMALL_DATA

COMMON = [
    "steps=3",
    "positives.min_dup_count=4",
    "prompts.n_ordinary=4",
    "prompts.n_heldout=2",
    "features.extractor.size=8",
    "trigger.steps=2",
    "trigger.restarts=2",
    "utility.n_prompts=6",
    "n_per_prompt=2",
    *SMALL_DATA,
]


def _mitigate(pipe_dir, name, *extra):
    return diffmem.run(
        "mitigate",
        [
            f"mitigation={name}",
            "model=local",
            f"model.path={pipe_dir}",
            "steps=3",
            "positives.min_dup_count=4",
            "prompts.n_ordinary=4",
            "prompts.n_heldout=2",
            "objectives.n_prompts=4",
            "features.extractor.size=8",
            *SMALL_DATA,
            *extra,
        ],
    )


def _study(path, name, values):
    import optuna

    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", directions=["minimize", "minimize"])
    for v in values:
        t = study.ask()
        t.suggest_float("mitigation.lr", 1e-5, 1e-3, log=True)
        study.tell(t, v)


def test_three_axes_in_one_table_with_a_pareto_figure(tiny_pipe_dir, tmp_path):
    gni = _mitigate(tiny_pipe_dir, "gni") / "model"
    full = _mitigate(tiny_pipe_dir, "full_ft", "mitigation.steps=2")
    _study(tmp_path / "s.db", "mc", [(1.0, 5.0), (2.0, 2.0), (3.0, 3.0)])
    args = [
        f"models.original={tiny_pipe_dir}",
        f"+models.gni={gni}",
        f"+models.full_ft={full / 'model'}",
        f"study={{path: {tmp_path / 's.db'}, name: mc}}",
        f"+pareto_runs.full_ft={full}",
        *COMMON,
        "utility.clip={name: clip, arch: ViT-S-32, pretrained: random, device: cpu}",
    ]
    run_dir = diffmem.run("evaluate-mitigation", args)
    table = pd.read_parquet(run_dir / "mitigations.parquet")
    assert table["model"].tolist() == ["original", "gni", "full_ft"]
    assert table["defence"].tolist()[1] == "gni"
    for col in ("mr", "mr_attacked", "fd", "diversity", "clip_score"):
        assert table[col].notna().all(), col
    assert table["clip_score"].between(0, 100).all()
    assert table["fd_ratio"].iloc[0] == 1.0
    np.testing.assert_allclose(table["fd_ratio"], table["fd"] / table["fd"].iloc[0])
    assert (run_dir / "mitigations.png").stat().st_size > 0 and (run_dir / "pareto.png").stat().st_size > 0
    pareto = pd.read_parquet(run_dir / "pareto.parquet")
    trials = pareto[pareto["run"] == "memcontrol"]
    assert trials["pareto"].tolist() == [True, True, False]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["model"] for r in metrics["table"]] == ["original", "gni", "full_ft"]
    assert metrics["pareto"]["n_trials"] == 3 and metrics["pareto"]["runs"][0]["run"] == "full_ft"
    assert metrics["provenance"]["versions"]["torch"]
    # a killed run resumes from its per-model parts and gives the same table
    for name in ("_SUCCESS", "info.json", "mitigations.parquet", "metrics.json"):
        (run_dir / name).unlink()
    (part,) = (run_dir / "models").glob("full_ft-*")
    shutil.rmtree(part)
    again = diffmem.run("evaluate-mitigation", args)
    pd.testing.assert_frame_equal(pd.read_parquet(again / "mitigations.parquet"), table)
    # another table over some of the same models reuses their parts (nothing is recomputed)
    shared = tmp_path / "parts"
    first = diffmem.run("evaluate-mitigation", [*args[:2], *COMMON, f"parts_dir={shared}", "name=a"])
    stamps = {p: p.stat().st_mtime_ns for p in shared.rglob("*.parquet")}
    diffmem.run(
        "evaluate-mitigation", [*args[:3], *COMMON, f"parts_dir={shared}", "name=b", "utility.clip=null"]
    )  # a setting left at null keeps the digests
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert len(list(shared.iterdir())) == 3 and first != again


def test_bad_evaluation_configs(tiny_pipe_dir, tmp_path):
    with pytest.raises(DataError, match=r"models.ghost: .*does not exist"):
        diffmem.run(
            "evaluate-mitigation", [f"models.original={tiny_pipe_dir}", f"+models.ghost={tmp_path}/nope", *COMMON]
        )
    with pytest.raises(ConfigError, match="reference 'base' is not one of models"):
        diffmem.run("evaluate-mitigation", [f"models.original={tiny_pipe_dir}", "reference=base", *COMMON])
    with pytest.raises(ConfigError, match=r"evaluate-mitigation.trigger.steps must be >= 1"):
        diffmem.run("evaluate-mitigation", [f"models.original={tiny_pipe_dir}", *COMMON, "trigger.steps=0"])
