"""Run dirs (diffmem.runs): claiming, resuming and refusing; claims of one folder take turns,
killed writes' temporary files are cleaned on resume, run names are one safe folder name."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from diffmem.errors import ConfigError
from diffmem.runs import (
    STALE_TMP_S,
    atomic_path,
    check_claim,
    check_run_name,
    claim,
    digest,
    read_json,
    resumed,
    write_json,
)


def test_key_added_with_null_default_keeps_run_dir_resumable(tmp_path):
    run_dir = tmp_path / "run"
    claim(run_dir, {"model": {"path": "m"}, "seed": 0})
    # a later version adds settings whose defaults are null: the old run dir still resumes
    newer = {"model": {"path": "m", "revision": None}, "seed": 0, "max_targets": None}
    assert check_claim(run_dir, newer)
    assert claim(run_dir, newer) == run_dir
    assert digest(newer) == digest({"model": {"path": "m"}, "seed": 0})
    # ...but a value that is set, or changed, is another config
    with pytest.raises(ConfigError, match=r"max_targets: None there, 4 now"):
        check_claim(run_dir, {**newer, "max_targets": 4})
    with pytest.raises(ConfigError, match=r"seed: 0 there, 1 now"):
        check_claim(run_dir, {**newer, "seed": 1})


def test_unclaimed_dir_is_not_created(tmp_path):
    assert not check_claim(tmp_path / "absent", {"seed": 0})
    assert not (tmp_path / "absent").exists()


def _claim(run_dir, config, start, out):
    start.wait()
    try:
        claim(run_dir, {"config": config})
        out.put(config)
    except ConfigError:
        out.put(None)


def test_racing_claims_of_one_folder_with_two_configs_one_wins(tmp_path):
    """Two processes claim one run dir with different configs at the same moment, 20 times:
    every time exactly one succeeds and run.json holds its config."""
    ctx = mp.get_context("fork")
    for i in range(20):
        run_dir = tmp_path / f"run{i}"
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_claim, args=(run_dir, c, start, out)) for c in ("a", "b")]
        for p in procs:
            p.start()
        start.set()
        for p in procs:
            p.join(30)
        won = [r for r in (out.get(timeout=5), out.get(timeout=5)) if r is not None]
        assert len(won) == 1, (i, won)
        assert read_json(run_dir / "run.json") == {"config": won[0]}


def test_claim_removes_temporary_files_of_killed_writes(tmp_path):
    run_dir = claim(tmp_path / "run", {"a": 1})
    (run_dir / "parts").mkdir()
    gone_pid = mp.get_context("fork").Process(target=lambda: None)
    gone_pid.start()
    gone_pid.join()
    with atomic_path(run_dir / "parts" / "x.npy") as tmp:  # a live write: this process's name
        live = tmp.name
    dead = run_dir / "parts" / live.replace(f"-{os.getpid()}.", f"-{gone_pid.pid}.")
    dead.write_bytes(b"half")  # written by a process that was killed
    old = run_dir / ".run.json.abc123.tmp"  # an older version's name, untouched for long
    old.write_bytes(b"half")
    t = time.time() - STALE_TMP_S - 60
    os.utime(old, (t, t))
    running = run_dir / live  # a write of a running process (this one) is left alone
    running.write_bytes(b"in progress")
    claim(run_dir, {"a": 1})
    assert not dead.exists() and not old.exists() and running.exists()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", None])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError, match="one folder name"):
        check_run_name(name)


def test_ordinary_run_names_pass():
    for name in ("default", "sd14", "clip-dataset", "v1.2_x", "..a"):
        check_run_name(name)


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for run_dir in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(ConfigError, match="cannot create the run dir there") as err:
            claim(run_dir, {"a": 1})
        assert str(run_dir) in str(err.value) and "\n" not in str(err.value)


def test_resumed_work_is_read_made_when_missing_and_remade_when_damaged(tmp_path, caplog):
    path, made = tmp_path / "tau.json", []

    def make():
        made.append(1)
        write_json(path, {"tau": 0.5})

    def read(p):
        return read_json(p)["tau"]

    assert resumed(path, read, make) == 0.5 and len(made) == 1  # missing: made
    assert resumed(path, read, make) == 0.5 and len(made) == 1  # intact: read, not made again
    path.write_text('{"tau": 0.')  # cut short
    caplog.set_level("WARNING")
    assert resumed(path, read, make) == 0.5 and len(made) == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(path) in warned[0] and "recomputing it" in warned[0], warned


def test_another_config_names_the_group_change_first(tmp_path):
    """``features=sscd_disc_large`` on a pixel run changes the descriptor and the thresholds it
    interpolates: the refusal names the descriptor (it once named ``dcr_threshold``, first
    alphabetically) and lists the others."""
    import diffmem
    from diffmem.runner import fingerprint

    run = tmp_path / "run"
    claim(run, fingerprint(diffmem.compose("audit")))
    with pytest.raises(ConfigError) as err:
        check_claim(run, fingerprint(diffmem.compose("audit", ["features=sscd_disc_large"])))
    msg = str(err.value)
    assert "(features.extractor.name: 'pixel' there, 'sscd_disc_large' now; also " in msg
    assert "dcr_threshold" in msg.partition("; also ")[2]
    with pytest.raises(ConfigError, match=r"\(k: 5 there, 7 now\)"):
        check_claim(run, fingerprint(diffmem.compose("audit", ["k=7"])))
