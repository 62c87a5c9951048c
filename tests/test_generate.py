"""The generate stage: outputs, per-sample seeds (batch-size invariance), resume, shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import diffmem
from diffmem.data import load_image
from diffmem.data.samples import plan_samples
from diffmem.errors import ConfigError
from diffmem.sampling import encode_prompts, sample, to_uint8
from tests.conftest import SMALL_DATA


def _args(pipe_dir, *extra):
    return [
        "model=local",
        f"model.path={pipe_dir}",
        "steps=2",
        "n_per_prompt=2",
        "prompts.n_ordinary=2",
        "prompts.n_heldout=2",
        *SMALL_DATA,
        *extra,
    ]


def test_generate_writes_images_and_table(tiny_pipe_dir):
    run_dir = diffmem.run("generate", _args(tiny_pipe_dir))
    res = diffmem.load_run(run_dir)
    samples = res.table("samples")
    prompts = res.table("prompts")
    assert res.done and len(samples) == 2 * len(prompts)
    assert samples["sample_id"].is_unique and samples["seed"].is_unique
    assert {"caption", "seed", "steps", "guidance_scale", "kind", "dup_count"} <= set(samples.columns)
    img = load_image(run_dir / samples["file"].iloc[0])
    assert img.shape == (32, 32, 3)
    assert res.fingerprint["n_per_prompt"] == 2


def test_batch_size_invariance(tiny_pipe):
    captions = ["a red circle above a blue square on a grey background", "the zorblax emblem"] * 4
    cond = encode_prompts(tiny_pipe, captions)
    seeds = list(range(100, 108))
    together = to_uint8(sample(tiny_pipe, cond, seeds, 32, 3, 3.0))
    alone = np.concatenate(
        [to_uint8(sample(tiny_pipe, cond[i : i + 1], seeds[i : i + 1], 32, 3, 3.0)) for i in range(8)]
    )
    assert np.abs(together.astype(int) - alone.astype(int)).max() <= 1
    assert (together == alone).mean() > 0.999
    other = to_uint8(sample(tiny_pipe, cond[:1], [999], 32, 3, 3.0))
    assert not np.array_equal(other[0], alone[0])


def test_resume_generates_only_missing(tiny_pipe_dir):
    run_dir = diffmem.run("generate", _args(tiny_pipe_dir))
    samples = pd.read_parquet(run_dir / "samples.parquet")
    victims = [run_dir / f for f in samples["file"].iloc[1::3]]
    kept = run_dir / samples["file"].iloc[0]
    before = [v.read_bytes() for v in victims]
    stamp = kept.stat().st_mtime_ns
    for victim in victims:
        victim.unlink()
    (run_dir / "_SUCCESS").unlink()  # as if killed before finishing
    diffmem.run("generate", _args(tiny_pipe_dir))
    # sampled again in the same batches as before (batching can move a pixel level): identical
    assert [v.read_bytes() for v in victims] == before
    assert kept.stat().st_mtime_ns == stamp  # finished work untouched
    again = pd.read_parquet(run_dir / "samples.parquet")
    pd.testing.assert_frame_equal(samples, again)


def test_shards_split_the_work(tiny_pipe_dir):
    args = _args(tiny_pipe_dir, "num_shards=2", "name=sharded")
    first = diffmem.run("generate", args + ["shard=0"])
    assert not (first / "samples.parquet").exists()  # waits for the other shard
    n0 = len(list((first / "samples").glob("*.png")))
    diffmem.run("generate", args + ["shard=1"])
    table = pd.read_parquet(first / "samples.parquet")
    assert n0 == (len(table) + 1) // 2 and len(list((first / "samples").glob("*.png"))) == len(table)


def test_changed_config_is_refused(tiny_pipe_dir):
    diffmem.run("generate", _args(tiny_pipe_dir, "name=fixed"))
    with pytest.raises(ConfigError, match="holds a run with another config"):
        diffmem.run("generate", _args(tiny_pipe_dir, "name=fixed", "guidance_scale=2.0"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("steps=-1", "steps must be >= 1"),
        ("n_per_prompt=0", "n_per_prompt must be >= 1"),
        ("shard=3", "shard must be in"),
        ("scheduler=fancy", "scheduler 'fancy'"),
    ],
)
def test_bad_config(tiny_pipe_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        diffmem.run("generate", _args(tiny_pipe_dir, override))


def test_plan_seeds_do_not_depend_on_other_prompts():
    a = plan_samples(pd.DataFrame({"prompt_id": [0, 1], "caption": ["x", "y"]}), 2, 0)
    b = plan_samples(pd.DataFrame({"prompt_id": [1], "caption": ["y"]}), 2, 0)
    assert a[a.prompt_id == 1]["seed"].tolist() == b["seed"].tolist()
    torch.manual_seed(0)  # global RNG state does not matter either
    assert plan_samples(pd.DataFrame({"prompt_id": [1], "caption": ["y"]}), 2, 0)["seed"].tolist() == b["seed"].tolist()


def test_cli_multirun(tiny_pipe_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFFMEM_OUTPUTS": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "diffmem.cli",
        "generate",
        "--multirun",
        "seed=0,1",
        *_args(tiny_pipe_dir, "name=sweep", "n_per_prompt=1", "steps=1"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    tables = [
        pd.read_parquet(tmp_path / "generate" / "multirun" / "sweep" / str(i) / "samples.parquet") for i in (0, 1)
    ]
    assert len(tables[0]) == len(tables[1]) > 0
    assert not set(tables[0]["seed"]) & set(tables[1]["seed"])  # base seed changes every sample seed


def test_fp16_on_the_cpu_runs_and_records_fp32(tiny_pipe_dir, tmp_path, caplog):
    """fp16 on the CPU runs in fp32: one log line, and info.json records fp32 (not what was asked)."""
    run_dir = diffmem.run(
        "generate", _args(tiny_pipe_dir, "model.precision=fp16", "device=cpu", f"run_dir={tmp_path / 'run'}")
    )
    from diffmem.runs import read_json

    assert read_json(run_dir / "info.json")["config"]["model"]["precision"] == "fp32"
    assert diffmem.load_run(run_dir).fingerprint["model"]["precision"] == "fp32"
    assert any(
        "model.precision=fp16 on the CPU" in r.getMessage() and "runs as fp32" in r.getMessage() for r in caplog.records
    )


def test_a_large_run_says_so_with_an_estimate(tiny_pipe_dir, tmp_path, caplog, monkeypatch):
    """Above the thresholds (10k prompts, 10k images; lowered here) a run logs its size before
    it starts and, after the first batch, an estimate of its time."""
    import diffmem.data.prompts
    import diffmem.sampling

    monkeypatch.setattr(diffmem.data.prompts, "LARGE_PROMPTS", 2)
    monkeypatch.setattr(diffmem.sampling, "LARGE_RUN", 4)
    diffmem.run("generate", _args(tiny_pipe_dir, "batch_size=2", f"run_dir={tmp_path / 'run'}"))
    n = len(pd.read_parquet(tmp_path / "run" / "prompts.parquet"))
    assert f"generate: {n:,} prompts x n_per_prompt=2 = {2 * n:,} images: a large run" in caplog.text
    assert f"generate: {2 * n:,} images to make; the first batch took" in caplog.text and "in all" in caplog.text
