"""The stage runner: derived fingerprints, verified resume, released claims, publishing."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import diffmem
from diffmem.errors import ConfigError, DataError
from diffmem.features.store import FeatureStore
from diffmem.runner import Job, Outcome, StageSpec, fingerprint, require_items
from diffmem.runs import INFO, METRICS, RUN_FILE, SUCCESS, write_json
from tests.test_formats import _store, _unit


def _cfg(tmp_path, **fields):
    return OmegaConf.create(
        {
            "run_dir": str(tmp_path / "run"),
            "name": "x",
            "threads": 1,
            "seed": 0,
            "data": {"root": "r", "on_error": "fail"},
            **fields,
        }
    )


class Counting:
    """A toy body writing ``out.txt`` (and metrics), counting its calls."""

    def __init__(self, fail: str | None = None):
        self.calls, self.fail = 0, fail

    def __call__(self, job: Job) -> Outcome:
        self.calls += 1
        if self.fail == "before":
            raise DataError("broken input")
        (job.dir / "out.txt").write_text(f"seed {job.cfg.seed}")
        if self.fail == "after":
            raise DataError("killed half-way")
        return Outcome({"n": 1}, {"what": "toy"}, {"score": 0.5})


def test_fingerprint_is_every_setting_but_the_volatile_ones():
    cfg = OmegaConf.create(
        {
            "seed": 1,
            "threads": 4,
            "device": "cpu",
            "run_dir": "/x",
            "batch_size": 8,
            "data": {"root": "r", "on_error": "skip", "max_pixels": 5, "kind": "folder"},
        }
    )
    fp = fingerprint(cfg, volatile=("batch_size",), extra={"digest": "abc"})
    assert fp == {"seed": 1, "data": {"root": "r", "kind": "folder"}, "digest": "abc"}


def test_a_finished_run_is_reused_and_published_once(tmp_path):
    body = Counting()
    spec = StageSpec("toy", body)
    run_dir = spec.run(_cfg(tmp_path))
    assert body.calls == 1
    assert json.loads((run_dir / METRICS).read_text())["score"] == 0.5
    assert "versions" in json.loads((run_dir / METRICS).read_text())["provenance"]
    info = json.loads((run_dir / INFO).read_text())
    assert info["stage"] == "toy" and info["what"] == "toy"
    success = json.loads((run_dir / SUCCESS).read_text())
    assert success["summary"] == {"n": 1} and {"out.txt", METRICS, INFO} <= set(success["outputs"])
    spec.run(_cfg(tmp_path, threads=2))  # a volatile setting changed: still the same run
    assert body.calls == 1


def test_a_new_setting_counts_without_being_listed(tmp_path):
    """Any setting added to a config is part of the fingerprint: a changed value refuses to resume,
    naming the key in one line."""
    spec = StageSpec("toy", Counting())
    spec.run(_cfg(tmp_path, new_setting={"depth": 1}))
    with pytest.raises(ConfigError, match=r"new_setting\.depth: 1 there, 2 now") as err:
        spec.run(_cfg(tmp_path, new_setting={"depth": 2}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["delete", "change", "truncate-success"])
def test_damaged_outputs_of_a_finished_run_are_recomputed(tmp_path, damage, caplog):
    body = Counting()
    spec = StageSpec("toy", body)
    run_dir = spec.run(_cfg(tmp_path))
    if damage == "delete":
        (run_dir / METRICS).unlink()
    elif damage == "change":
        (run_dir / "out.txt").write_text("tampered")
    else:
        (run_dir / SUCCESS).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="diffmem.runner"):
        spec.run(_cfg(tmp_path))
    assert body.calls == 2
    assert (run_dir / "out.txt").read_text() == "seed 0" and (run_dir / METRICS).exists()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "recomputing" in lines[0] and str(run_dir) in lines[0]
    spec.run(_cfg(tmp_path))
    assert body.calls == 2  # intact again


def test_a_failing_guard_reopens_a_finished_run(tmp_path):
    body = Counting()
    spec = StageSpec("toy", body, guard=lambda cfg, summary: "skipped images" if cfg.data.on_error == "fail" else None)
    spec.run(_cfg(tmp_path, data={"root": "r", "on_error": "skip"}))
    spec.run(_cfg(tmp_path, data={"root": "r", "on_error": "skip"}))
    assert body.calls == 1
    spec.run(_cfg(tmp_path))  # the same run, now under on_error=fail
    assert body.calls == 2


def test_a_run_failing_before_any_output_leaves_no_claim(tmp_path):
    with pytest.raises(DataError):
        StageSpec("toy", Counting(fail="before")).run(_cfg(tmp_path))
    assert not (tmp_path / "run").exists()
    StageSpec("toy", Counting()).run(_cfg(tmp_path, seed=7))  # the corrected command is not refused


def test_a_run_killed_after_some_output_keeps_its_claim_and_resumes(tmp_path):
    with pytest.raises(DataError):
        StageSpec("toy", Counting(fail="after")).run(_cfg(tmp_path))
    assert (tmp_path / "run" / RUN_FILE).exists() and not (tmp_path / "run" / SUCCESS).exists()
    with pytest.raises(ConfigError, match="seed: 0 there, 7 now"):
        StageSpec("toy", Counting()).run(_cfg(tmp_path, seed=7))


def test_changed_input_table_of_a_finished_run_is_refused(tmp_path):
    table = pd.DataFrame({"file": ["a.png", "b.png"]})
    spec = StageSpec("toy", Counting(), inputs=lambda cfg, ctx: {"item list": ctx}, prepare=lambda cfg: table)
    spec.run(_cfg(tmp_path))
    table.loc[2] = ["c.png"]
    with pytest.raises(ConfigError, match="item list changed since this run started \\(2 rows then, 3 now\\)"):
        spec.run(_cfg(tmp_path))


def test_an_incomplete_shard_publishes_nothing(tmp_path):
    spec = StageSpec("toy", lambda job: Outcome(complete=False))
    run_dir = spec.run(_cfg(tmp_path))
    assert (run_dir / RUN_FILE).exists() and not (run_dir / SUCCESS).exists() and not (run_dir / INFO).exists()


def test_a_damaged_sub_run_reopens_its_parent(tmp_path):
    inner = StageSpec("inner", Counting())
    calls = []

    def outer_body(job):
        calls.append(1)
        inner.run(OmegaConf.merge(job.cfg, {"run_dir": str(job.dir / "step")}))
        return Outcome({})

    outer = StageSpec("outer", outer_body)
    run_dir = outer.run(_cfg(tmp_path))
    (run_dir / "step" / "out.txt").unlink()
    outer.run(_cfg(tmp_path))
    assert len(calls) == 2 and (run_dir / "step" / "out.txt").exists()


def test_zero_items_is_an_error():
    with pytest.raises(DataError, match="no images to publish"):
        require_items(0, "images", "embed run")
    require_items(1, "images", "embed run")


def test_a_setting_added_to_a_stage_refuses_to_resume_when_changed(tmp_path):
    """End to end through a real stage (index) and composition: a key the stage never names."""
    ref = _store(tmp_path / "ref", [_unit(6, seed=0)]).run_dir
    args = [f"features_dir={ref}", f"run_dir={tmp_path / 'idx'}"]
    diffmem.run("index", args + ["+index.new_knob=1"])
    diffmem.run("index", args + ["+index.new_knob=1", "threads=1"])  # threads never counts
    with pytest.raises(ConfigError, match=r"index\.new_knob: 1 there, 2 now"):
        diffmem.run("index", args + ["+index.new_knob=2"])


def test_a_deleted_index_is_rebuilt_not_trusted(tmp_path):
    ref = _store(tmp_path / "ref", [_unit(6, seed=0)]).run_dir
    args = [f"features_dir={ref}", f"run_dir={tmp_path / 'idx'}"]
    idx = diffmem.run("index", args)
    (idx / "index.faiss").unlink()
    diffmem.run("index", args)
    assert (idx / "index.faiss").exists()
    write_json(idx / "index_info.json", {"tampered": True})
    diffmem.run("index", args)
    assert "tampered" not in json.loads((idx / "index_info.json").read_text())
    assert np.isfinite(json.loads((idx / SUCCESS).read_text())["summary"]["ntotal"])


def test_volatile_batch_sizes_do_not_change_results(tiny_pipe, tmp_path):
    """The batch sizes the specs mark volatile: sampling (probe, mitigate, evaluate-mitigation,
    generalise) gives the same images whatever the batch, and embed the same vectors."""
    from diffmem.probes.replication import sample_images
    from diffmem.sampling import encode_prompts
    from tests.conftest import SMALL_DATA

    cond = encode_prompts(tiny_pipe, ["a red circle", "a blue square", "a green star"])
    kw = dict(resolution=32, steps=2, guidance=3.0)
    one = sample_images(tiny_pipe, cond, [5, 6, 7], batch_size=1, **kw)
    three = sample_images(tiny_pipe, cond, [5, 6, 7], batch_size=3, **kw)
    assert torch.allclose(one, three, atol=1e-5)
    vectors = [
        FeatureStore(
            diffmem.run(
                "embed", [*SMALL_DATA, "features.extractor.size=8", f"batch_size={b}", f"run_dir={tmp_path / f'e{b}'}"]
            )
        ).load()[0]
        for b in (1, 7)
    ]
    assert np.array_equal(*vectors)


@pytest.mark.parametrize("stage", ["detect", "audit", "dedup", "probe"])
def test_damaged_outputs_of_the_other_stages_are_recomputed(stage, tiny_pipe_dir, tmp_path):
    """The stages the fault suite does not kill: a finished run with its largest published file cut
    short and another deleted is recomputed on re-run, equal to what it published first (reports,
    which carry the run's date, excepted)."""
    from tests.conftest import SMALL_DATA
    from tests.reliability.faultlib import snapshot

    pipe = ["model=local", f"model.path={tiny_pipe_dir}"]
    args = {
        "detect": [
            *pipe,
            "detect=noise_norm",
            "detect.num_inference_steps=4",
            "prompts.n_ordinary=2",
            "prompts.n_heldout=2",
            "positives.min_dup_count=4",
            *SMALL_DATA,
        ],
        "audit": [
            *pipe,
            "model.num_inference_steps=2",
            "n_per_prompt=2",
            "prompts.n_ordinary=2",
            "prompts.n_heldout=2",
            "features.extractor.size=8",
            *SMALL_DATA,
        ],
        "dedup": ["data=testbed", "split=train", "features=pixel", "threshold=0.95", *SMALL_DATA],
        "probe": [
            *pipe,
            "probe=trigger_search",
            "probe.steps=2",
            "probe.restarts=1",
            "features.extractor.size=8",
            "steps=3",
            "n_per_prompt=2",
            "n_controls=1",
            "positives.min_dup_count=4",
            "prompts.n_ordinary=4",
            "prompts.n_heldout=2",
            *SMALL_DATA,
        ],
    }[stage]
    args.append(f"run_dir={tmp_path / 'run'}")
    run_dir = diffmem.run(stage, args)
    first = snapshot(run_dir)
    listed = json.loads((run_dir / SUCCESS).read_text())["outputs"]
    largest = max(listed, key=lambda rel: listed[rel]["size"])
    (run_dir / largest).write_bytes((run_dir / largest).read_bytes()[: listed[largest]["size"] // 2])
    (run_dir / sorted(set(listed) - {largest})[0]).unlink()
    diffmem.run(stage, args)
    again = snapshot(run_dir)
    assert set(again) == set(first)
    # reports carry the run's date; every table, figure, JSON (timings aside) and model must be equal
    differ = [
        k for k in first if k != "_SUCCESS" and not k.endswith(".html") and _untimed(again[k]) != _untimed(first[k])
    ]
    assert not differ, differ


def _untimed(value):
    """``value`` (a snapshot entry) without what differs between two runs of one config: timings,
    and the rows each rank computed (a resumed run counts only what it recomputed)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "seconds" not in k and k != "data_parallel"}
    return value
