"""The generalise stage: two models per n on disjoint subsets, the same noises, one summary of every n."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

import diffmem
import diffmem.generalise
import diffmem.sampling
import diffmem.training
from diffmem.errors import ConfigError
from diffmem.metrics.generalisation import transition_n
from diffmem.runs import read_json
from tests.conftest import SMALL_DATA

ARGS = [
    *SMALL_DATA,
    "unet.steps=2",
    "unet.batch_size=4",
    "unet.ckpt_every=2",
    "samples=3",
    "sample_steps=2",
    "batch_size=4",
    "threads=1",
]
VAE_FILE = "diffusion_pytorch_model.safetensors"


def test_two_sizes_bookkeeping_and_resume(tiny_pipe_dir, monkeypatch):
    args = ARGS + [f"vae_path={tiny_pipe_dir / 'vae'}"]
    seeds = []
    real_sample = diffmem.sampling.sample

    def recording(pipe, cond, batch_seeds, *a, **kw):
        seeds.append(list(batch_seeds))
        return real_sample(pipe, cond, batch_seeds, *a, **kw)

    monkeypatch.setattr(diffmem.sampling, "sample", recording)
    for n in (2, 4):
        run_dir = diffmem.run("generalise", args + [f"n={n}"])

    table = pd.read_parquet(run_dir / "generalisation.parquet")
    assert table["n"].tolist() == [2, 4] and (table["samples"] == 3).all()
    cols = ["cross_sim", "nn_sim", "shuffled_sim", "heldout_nn_sim", "vae_ceiling"]
    assert table[cols].notna().all().all() and (table[cols].abs() <= 1 + 1e-6).all().all()
    assert (run_dir / "generalisation.png").stat().st_size > 0
    assert read_json(run_dir / "summary.json")["n"] == [2, 4]

    assert seeds[0] == seeds[1] == seeds[2] == seeds[3]  # both models of both n: the same noises
    for n in (2, 4):
        out = run_dir / f"n-{n:05d}"
        pairs, subsets = pd.read_parquet(out / "pairs.parquet"), pd.read_parquet(out / "subsets.parquet")
        assert pairs["seed"].tolist() == seeds[0]
        ids = {m: set(g["image_id"]) for m, g in subsets.groupby("model")}
        assert len(ids["a"]) == len(ids["b"]) == n and not ids["a"] & ids["b"]
        assert set(pairs["nn_id_a"]) <= ids["a"] and set(pairs["nn_id_b"]) <= ids["b"]
        # the train option vae.path: both models keep the given VAE, untouched
        for m in ("a", "b"):
            saved = load_file(out / m / "train" / "model" / "vae" / VAE_FILE)
            given = load_file(tiny_pipe_dir / "vae" / VAE_FILE)
            assert all((saved[k] == given[k]).all() for k in given)

    stamp = (run_dir / "n-00002" / "pairs.parquet").stat().st_mtime_ns
    monkeypatch.setattr(diffmem.generalise, "measure", lambda *a: pytest.fail("a finished n was retrained"))
    diffmem.run("generalise", args + ["n=2"])
    assert (run_dir / "n-00002" / "pairs.parquet").stat().st_mtime_ns == stamp
    assert pd.read_parquet(run_dir / "generalisation.parquet")["n"].tolist() == [2, 4]

    with pytest.raises(ConfigError, match="unet.steps: 2 there, 3 now"):
        diffmem.run("generalise", args + ["n=8", "unet.steps=3"])
    assert not (run_dir / "n-00008").exists()


def test_too_large_subset_is_one_line_and_writes_nothing(tiny_pipe_dir, tmp_path):
    # the small testbed has 24 ordinary images: two disjoint parts of 13 do not fit
    out = subprocess.run(
        [sys.executable, "-m", "diffmem.generalise", *ARGS, "n=13", f"vae_path={tiny_pipe_dir / 'vae'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "diffmem generalise: error: data.subset.size: two disjoint parts of 13 images need 26, "
        "the dataset has 24 ordinary images"
    ]
    assert not list(Path(os.environ["DIFFMEM_OUTPUTS"]).rglob("run.json"))  # nothing claimed


def test_transition_is_interpolated_on_log_n():
    assert transition_n([1, 4, 16], [0.5, 0.6, 0.9], [0.9, 0.8, 0.7]) == pytest.approx(8.0)
    assert transition_n([1, 4, 16], [0.5, 0.6, 0.7], [0.9, 0.8, 0.75]) is None  # never reached
    assert transition_n([1, 4], [0.9, 0.95], [0.8, 0.7]) is None  # no crossing inside the range
    assert np.isclose(transition_n([4, 16], [0.7, 0.8], [0.8, 0.8]), 16.0)
