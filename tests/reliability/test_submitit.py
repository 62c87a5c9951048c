"""A ``--multirun`` through Hydra's submitit launcher survives a SIGKILLed job.

``diffmem generate --multirun hydra/launcher=submitit_local seed=0,1`` runs two jobs,
each in ``<sweep dir>/<job num>``. One job is SIGKILLed mid-stage (some PNGs written,
no ``_SUCCESS``); the same command is then submitted again: the finished job is a no-op,
the killed one resumes in the same dir (job dirs are a function of the sweep's overrides
and their order), and both end up equal to uninterrupted runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import diffmem
from tests.conftest import SMALL_DATA
from tests.reliability.faultlib import KILLS, assert_all_readable, snapshot

ARGS = ["model=local", "steps=2", "n_per_prompt=2", "batch_size=2", *SMALL_DATA]
VICTIM = 1  # the launcher collects results in job order: after job 1 fails, none is left running
TIMEOUT_S = 300


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaps counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return out


def _job_pid(sweep: Path, job_num: int) -> int | None:
    """The process running sweep job ``job_num`` (the task under its submitit controller)."""
    from submitit.core.utils import DelayedSubmission

    for pickle in sweep.glob(".submitit/*/*_submitted.pkl"):
        if DelayedSubmission.load(pickle).args[2] == job_num:
            tasks = _children(int(pickle.parent.name))  # the folder is named by the controller's pid
            return tasks[0] if tasks else None
    return None


def _wait(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` until true; fail on timeout or if ``proc`` exits first."""
    end = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        assert proc is None or proc.poll() is None, f"the multirun exited (code {proc.returncode}) before {what}"
        time.sleep(0.01)


def _outputs(run_dir: Path) -> dict:
    return {k: v for k, v in snapshot(run_dir).items() if k.startswith("samples") or k == "prompts.parquet"}


@pytest.mark.slow
def test_killed_job_resumes_when_the_multirun_is_resubmitted(tiny_pipe_dir, tmp_path):
    args = [*ARGS, f"model.path={tiny_pipe_dir}"]
    refs = [_outputs(diffmem.run("generate", [*args, f"seed={s}", f"name=ref{s}"])) for s in (0, 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "diffmem.cli",
        "generate",
        "--multirun",
        "hydra/launcher=submitit_local",
        "seed=0,1",
        *args,
        "name=sweep",
    ]
    sweep = Path(os.environ["DIFFMEM_OUTPUTS"]) / "generate" / "multirun" / "sweep"
    victim = sweep / str(VICTIM)

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: len(list(victim.glob("samples/*.png"))) >= 4, "job 1's 4th PNG", proc)
            assert not (victim / "_SUCCESS").exists()
            pid = _job_pid(sweep, VICTIM)
            assert pid is not None, f"no process found for job {VICTIM} under {sweep}/.submitit"
            os.kill(pid, signal.SIGKILL)
            KILLS["performed"] += 1
            assert proc.wait(TIMEOUT_S) != 0  # the launcher reports the lost job
        finally:
            if proc.poll() is None:
                proc.kill()
    controllers = [int(p.name) for p in sweep.glob(".submitit/[0-9]*")]
    _wait(lambda: not any(map(_alive, controllers)), "the first submission's jobs to end")
    assert not (victim / "_SUCCESS").exists()
    done = len(list(victim.glob("samples/*.png")))
    assert 0 < done < len([k for k in refs[VICTIM] if k.endswith(".png")]), "not killed mid-stage"
    assert_all_readable(victim, "after SIGKILL of a submitit job")
    finished = (sweep / "0" / "samples.parquet").stat().st_mtime_ns  # job 0 was not killed

    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert (sweep / "0" / "samples.parquet").stat().st_mtime_ns == finished  # a no-op
    for job, ref in enumerate(refs):
        run_dir = sweep / str(job)
        assert (run_dir / "_SUCCESS").exists()
        table = pd.read_parquet(run_dir / "samples.parquet")
        assert table["sample_id"].is_unique
        pngs = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("samples/*.png"))
        assert sorted(table["file"]) == pngs  # one PNG per row, no extras
        got = _outputs(run_dir)
        assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref), f"job {job} differs"
    KILLS["checked"] += 1


@pytest.mark.slow
def test_memcontrol_study_through_submitit_local(tiny_pipe_dir, tmp_path):
    """MemControl's Optuna study with every trial a submitit job (two at a time), then the same
    study continued by the plain launcher: one SQLite study, trials from both launches."""
    from diffmem.mitigations.memcontrol import study_table

    out = tmp_path / "outputs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFMEM_OUTPUTS": str(out)}
    base = [
        sys.executable,
        "-m",
        "diffmem.cli",
        "mitigate",
        "experiment=memcontrol",
        "model=local",
        f"model.path={tiny_pipe_dir}",
        "steps=2",
        "positives.min_dup_count=4",
        "prompts.n_ordinary=4",
        "prompts.n_heldout=2",
        "objectives.n_prompts=4",
        "features.extractor.size=8",
        "mitigation.steps=3",
        "hydra.sweeper.sampler.population_size=2",
        *SMALL_DATA,
    ]
    for extra in (["hydra/launcher=submitit_local", "total_trials=2"], ["total_trials=3"]):
        r = subprocess.run([*base, *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sweep = out / "mitigate" / "multirun" / "memcontrol"
    assert list(sweep.glob(".submitit/*/*_submitted.pkl"))  # the first two ran as submitit jobs
    table = study_table(f"sqlite:///{out / 'mitigate' / 'multirun' / 'memcontrol.db'}", "memcontrol-local")
    assert sorted(table["trial"]) == [0, 1, 2]
