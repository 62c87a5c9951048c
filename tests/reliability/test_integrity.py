"""Integrity on resume: a damaged piece of a run is found cheaply and recomputed, not trusted.

A feature part or sample PNG cut short after it was written (a full disk, a bad copy), in a
finished or an unfinished run, is noticed when its stage runs again (from the part's
``.npy`` header and size; the PNG's signature and end marker), removed with one warning
line naming it, and recomputed: the run ends as if nothing had happened (identical bytes).
The same holds for a testbed cache whose manifest is unreadable (rebuilt). Damaged training
checkpoints: ``tests/test_train.py``.
"""

from __future__ import annotations

import logging

import pandas as pd

import diffmem
from tests.reliability.test_bad_inputs import _embed_args, _folder, _gen_args


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _embed_run(tmp_path):
    root = _folder(tmp_path, n=5)
    args = _embed_args(root, tmp_path / "run")
    return args, diffmem.run("embed", args)


def test_truncated_part_of_a_finished_embed_run_is_recomputed(tmp_path, caplog):
    args, run = _embed_run(tmp_path)
    part = run / "features" / "part-00001.npy"
    good, ids = part.read_bytes(), (run / "ids.parquet").read_bytes()
    _cut(part)
    caplog.set_level(logging.WARNING)
    diffmem.run("embed", args)
    warned = _warnings(caplog)
    assert len(warned) == 1 and str(part) in warned[0] and "recomputing it" in warned[0], warned
    assert part.read_bytes() == good and (run / "ids.parquet").read_bytes() == ids
    assert (run / "_SUCCESS").exists()
    caplog.clear()
    diffmem.run("embed", args)  # intact now: a no-op, silent
    assert not _warnings(caplog)


def test_damaged_part_of_an_unfinished_embed_run_is_recomputed(tmp_path, caplog):
    """Killed before publishing (no ids, info or ``_SUCCESS``) with a part cut short and one
    with the wrong number of rows: both are recomputed on resume, the good one kept."""
    args, run = _embed_run(tmp_path)
    parts = sorted((run / "features").glob("part-*.npy"))
    good = [p.read_bytes() for p in parts]
    for name in ("_SUCCESS", "info.json", "ids.parquet", "items.parquet", "skipped.parquet"):
        (run / name).unlink()
    _cut(parts[0], 0.9)
    import numpy as np

    np.save(parts[2], np.load(parts[1]))  # a complete array, but part 1's two rows for part 2's one
    stamp = parts[1].stat().st_mtime_ns
    caplog.set_level(logging.WARNING)
    diffmem.run("embed", args)
    warned = _warnings(caplog)
    assert len(warned) == 2 and str(parts[0]) in warned[0] and str(parts[2]) in warned[1], warned
    assert [p.read_bytes() for p in parts] == good and parts[1].stat().st_mtime_ns == stamp
    assert (run / "_SUCCESS").exists()


def test_truncated_sample_of_a_finished_generate_run_is_recomputed(tmp_path, tiny_pipe_dir, caplog):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    args = _gen_args(tiny_pipe_dir, tmp_path / "p.txt", tmp_path / "gen", "n_per_prompt=2")
    run = diffmem.run("generate", args)
    png = run / "samples" / "p00001-s001.png"
    good, table = png.read_bytes(), (run / "samples.parquet").read_bytes()
    _cut(png, 0.7)
    caplog.set_level(logging.WARNING)
    diffmem.run("generate", args)
    warned = _warnings(caplog)
    assert len(warned) == 1 and str(png) in warned[0] and "cut short" in warned[0], warned
    assert png.read_bytes() == good and (run / "samples.parquet").read_bytes() == table
    assert (run / "_SUCCESS").exists()


def test_unreadable_testbed_cache_is_rebuilt(tmp_path, caplog):
    from diffmem.data.testbed import MANIFEST, generate_testbed

    small = dict(
        n_ordinary=4, canary_counts=(1, 2), canaries_per_count=1, n_templates=1, template_copies=2, n_heldout=2
    )
    want = generate_testbed(tmp_path, **small)
    _cut(tmp_path / MANIFEST)
    caplog.set_level(logging.WARNING)
    got = generate_testbed(tmp_path, **small)
    warned = _warnings(caplog)
    assert len(warned) == 1 and str(tmp_path / MANIFEST) in warned[0] and "rebuilding" in warned[0], warned
    pd.testing.assert_frame_equal(got, want)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / MANIFEST), want)
