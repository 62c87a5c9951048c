"""Fault injection: SIGKILL a stage at a random point, re-run the same command, compare.

For every stage (generate, embed, index in ``mode=single`` and the sharded
train/add/merge sequence, with kills during its merge on their own, search, train, and
mitigate: MemControl's masked LoRA inner loop and adversarial fine-tuning) an uninterrupted
reference run is made first. Then each
case deletes the run dir, runs the stage's commands, SIGKILLs one of them at a random
(seeded) point, checks that every file visible under its final name parses, re-runs the
killed command (sometimes killing it again) and the rest, and requires the run dir's
published outputs to equal the reference byte for byte (parquet, PNG, .npy, FAISS and
safetensors files; JSON minus date/versions/git): no lost rows, no duplicated rows, no
extra or missing files.

The kill points: a glob under the run dir reaching a count (the n-th PNG, feature part or
checkpoint; a temporary ``.*.tmp`` file) plus a few ms, a plain delay after the start, or
the middle of the n-th file write (``faultlib.KillPoint.write``; n up to the number of
writes the reference run made). A point the stage passes too quickly may miss (the run
finishes): such a case is not counted, and each test draws seeds until it made its
number of kills.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import diffmem
from tests.conftest import SMALL_DATA
from tests.reliability.faultlib import (
    KILLS,
    KillPoint,
    assert_all_readable,
    assert_same_outputs,
    count_writes,
    run_stage,
    snapshot,
)

Command = tuple[str, list[str]]


@dataclass
class Reference:
    """An uninterrupted run: its outputs (``faultlib.snapshot``), duration and writes."""

    outputs: dict
    seconds: float  # wall time of the uninterrupted commands (in-process, warm)
    writes: list[int]  # file writes made by each command


@dataclass
class Scenario:
    """Commands that fill one run dir, in order, and how to draw a kill point."""

    name: str
    commands: Callable[[Path, Path], list[Command]]  # (tiny pipeline folder, outputs root)
    draw: Callable[[np.random.Generator, Reference], tuple[int, KillPoint]]
    skip: tuple[str, ...] = ()  # run-dir folders outside the comparison (still checked readable)
    needs: tuple[str, ...] = field(default=())  # scenarios whose reference run is an input


def _count(ref: dict, prefix: str, suffix: str) -> int:
    return sum(k.startswith(prefix) and k.endswith(suffix) for k in ref)


def _pick(rng: np.random.Generator, options: list[tuple[float, Callable[[], KillPoint]]]) -> KillPoint:
    weights = np.array([w for w, _ in options])
    return options[rng.choice(len(options), p=weights / weights.sum())][1]()


def _timed(rng, seconds: float) -> KillPoint:
    return KillPoint(None, delay=float(rng.uniform(0, seconds)))


def _mid_write(rng, ref: Reference, command: int) -> KillPoint:
    return KillPoint(None, write=int(rng.integers(1, ref.writes[command] + 1)))


def _soon(rng) -> float:
    return float(rng.uniform(0, 0.02))


GEN = [
    "model=local",
    "steps=2",
    "n_per_prompt=2",
    "batch_size=3",
    "prompts.n_ordinary=4",
    "prompts.n_heldout=2",
    "name=g",
    *SMALL_DATA,
]
EMBED = ["features.extractor.size=8", "part_size=3", "batch_size=2", "name=e", *SMALL_DATA]
IVF = ["index.factory='IVF2,Flat'", "index.train_sample=null", "index.nprobe=2", "recall.queries=10"]
MITIGATE = [
    "model=local",
    "steps=2",
    "positives.min_dup_count=4",
    "prompts.n_ordinary=4",
    "prompts.n_heldout=2",
    "objectives.n_prompts=4",
    "features.extractor.size=8",
    *SMALL_DATA,
]
MEMCONTROL = [
    "mitigation=memcontrol",
    "+mitigation.mask.mid_block.attentions.0=1",
    "mitigation.steps=6",
    "mitigation.ckpt_every=2",
    "mitigation.noise_filter={quantile: 0.9, n_calibration: 16}",
    "name=m",
]
ADVERSARIAL = [
    "mitigation=adversarial_ft",
    "mitigation.steps=4",
    "mitigation.refresh_every=2",
    "mitigation.ckpt_every=1",
    "mitigation.trigger.steps=2",
    "mitigation.surrogate.n_candidates=2",
    "mitigation.surrogate.n_steps=2",
    "name=a",
]
TRAIN = [
    "arch=tiny",
    "unet.steps=6",
    "unet.batch_size=4",
    "unet.lr=1e-3",
    "unet.ckpt_every=2",
    "vae.steps=3",
    "vae.batch_size=4",
    "vae.ckpt_every=1",
    "name=t",
    *SMALL_DATA,
]


def _generate_point(rng, ref):
    n = _count(ref.outputs, "samples/", ".png")
    return 0, _pick(
        rng,
        [
            (4, lambda: KillPoint("samples/*.png", int(rng.integers(1, n)), _soon(rng))),
            (1, lambda: KillPoint("samples/.*.tmp")),
            (1, lambda: KillPoint("prompts.parquet", 1, _soon(rng))),
            (1, lambda: _timed(rng, ref.seconds)),
            (3, lambda: _mid_write(rng, ref, 0)),
        ],
    )


def _embed_point(rng, ref):
    n = _count(ref.outputs, "features/part-", ".npy")
    return 0, _pick(
        rng,
        [
            (4, lambda: KillPoint("features/part-*.npy", int(rng.integers(1, n)), _soon(rng))),
            (1, lambda: KillPoint("features/.*.tmp")),
            (1, lambda: KillPoint("inputs.json", 1, _soon(rng))),
            (1, lambda: _timed(rng, ref.seconds)),
            (3, lambda: _mid_write(rng, ref, 0)),
        ],
    )


def _index_point(rng, ref):
    return 0, _pick(
        rng,
        [
            (1, lambda: KillPoint(".*.tmp")),
            (1, lambda: KillPoint("index.faiss", 1, _soon(rng))),
            (2, lambda: _timed(rng, ref.seconds)),
            (2, lambda: _mid_write(rng, ref, 0)),
        ],
    )


def _sharded_point(rng, ref):
    step = int(rng.integers(0, 4))  # train, add shard 0, add shard 1, merge
    target = ["empty.faiss", "shards/shard-0000-*", "shards/shard-0001-*", "index.faiss"][step]
    return step, _pick(
        rng,
        [
            (1, lambda: KillPoint(".*.tmp" if step in (0, 3) else "shards/.*.tmp")),
            (1, lambda: KillPoint(target, 1, _soon(rng))),
            (2, lambda: _timed(rng, ref.seconds / 4)),
            (2, lambda: _mid_write(rng, ref, step)),
        ],
    )


def _merge_point(rng, ref):
    """A kill during ``mode=merge`` (the train and add commands before it complete)."""
    return 3, _pick(
        rng,
        [
            (1, lambda: KillPoint(".*.tmp")),
            (1, lambda: KillPoint("index.faiss", 1, _soon(rng))),
            (4, lambda: _mid_write(rng, ref, 3)),
        ],
    )


def _search_point(rng, ref):
    return 0, _pick(
        rng,
        [
            (1, lambda: KillPoint(".*.tmp")),
            (1, lambda: KillPoint("matches.parquet", 1, _soon(rng))),
            (1, lambda: _timed(rng, ref.seconds)),
            (4, lambda: _mid_write(rng, ref, 0)),
        ],
    )


def _train_point(rng, ref):
    return 0, _pick(
        rng,
        [
            (2, lambda: KillPoint("checkpoints/vae/step-*", int(rng.integers(1, 3)), _soon(rng))),
            (3, lambda: KillPoint("checkpoints/unet/step-*", int(rng.integers(1, 3)), _soon(rng))),
            (1, lambda: KillPoint("checkpoints/*/.*.tmp")),
            (1, lambda: KillPoint("vae/config.json", 1, _soon(rng))),
            (1, lambda: KillPoint("train_log.parquet", 1, _soon(rng))),
            (1, lambda: KillPoint("model/unet/*", 1, _soon(rng))),
            (2, lambda: _timed(rng, ref.seconds)),
            (4, lambda: _mid_write(rng, ref, 0)),
        ],
    )


def _mitigate_point(*patterns: str):
    """Kill points of a mitigate run: a checkpoint, a temporary file, the model, ``patterns``."""

    def draw(rng, ref):
        return 0, _pick(
            rng,
            [
                (3, lambda: KillPoint("checkpoints/step-*", int(rng.integers(1, 3)), _soon(rng))),
                (1, lambda: KillPoint("checkpoints/.*.tmp")),
                (1, lambda: KillPoint("model/*", 1, _soon(rng))),  # a pipeline or an adapter folder
                *[(1, lambda p=p: KillPoint(p, 1, _soon(rng))) for p in patterns],
                (2, lambda: _timed(rng, ref.seconds)),
                (4, lambda: _mid_write(rng, ref, 0)),
            ],
        )

    return draw


def _features_dir(outputs: Path) -> str:
    return f"features_dir={outputs / 'embed' / 'e'}"


def _sharded(out: Path, name: str) -> list[Command]:
    """Train an IVF index, add its two shards, merge them."""
    return [
        ("index", [_features_dir(out), *IVF, f"name={name}", *extra])
        for extra in (
            ["mode=train"],
            ["mode=add", "num_shards=2", "shard=0"],
            ["mode=add", "num_shards=2", "shard=1"],
            ["mode=merge", "num_shards=2"],
        )
    ]


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("generate", lambda pipe, out: [("generate", [*GEN, f"model.path={pipe}"])], _generate_point),
        Scenario("embed", lambda pipe, out: [("embed", EMBED)], _embed_point),
        Scenario(
            "index-single",
            lambda pipe, out: [("index", [_features_dir(out), *IVF, "name=i"])],
            _index_point,
            needs=("embed",),
        ),
        Scenario("index-sharded", lambda pipe, out: _sharded(out, "s"), _sharded_point, needs=("embed",)),
        Scenario("index-merge", lambda pipe, out: _sharded(out, "m"), _merge_point, needs=("embed",)),
        Scenario(
            "search",
            lambda pipe, out: [
                ("search", [f"index_dir={out / 'index' / 'i'}", f"queries_dir={out / 'embed' / 'e'}", "k=3", "name=q"])
            ],
            _search_point,
            needs=("index-single",),
        ),
        # checkpoints/ is left out of the comparison (still checked readable): a kill between
        # saving the last checkpoint and pruning the oldest one leaves one more behind
        Scenario("train", lambda pipe, out: [("train", TRAIN)], _train_point, skip=("checkpoints",)),
        # MemControl's inner loop (masked LoRA with the noise filter) and adversarial fine-tuning
        Scenario(
            "mitigate-finetune",
            lambda pipe, out: [("mitigate", [*MITIGATE, *MEMCONTROL, f"model.path={pipe}"])],
            _mitigate_point("tau.json", "objectives.json"),
            skip=("checkpoints",),
        ),
        Scenario(
            "mitigate-adversarial",
            lambda pipe, out: [("mitigate", [*MITIGATE, *ADVERSARIAL, f"model.path={pipe}"])],
            _mitigate_point("triggers/refresh-*", "surrogates.safetensors"),
            skip=("checkpoints",),
        ),
    ]
}


def _run_dir(outputs: Path, command: Command) -> Path:
    stage, overrides = command
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("name="))
    return outputs / stage / name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def references(workdir, tiny_pipe_dir):
    """Uninterrupted runs of every scenario (in-process, which also warms the imports)."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            scenario = SCENARIOS[name]
            for dep in scenario.needs:
                get(dep)
            commands = scenario.commands(tiny_pipe_dir, workdir / "ref")
            diffmem.run(*commands[0])  # warm-up: lazy imports and the cached testbed
            run_dir = _run_dir(workdir / "ref", commands[0])
            shutil.rmtree(run_dir)
            start, writes = time.monotonic(), []
            for command in commands:
                with count_writes() as n:
                    diffmem.run(*command)
                writes.append(n[0])
            cache[name] = Reference(snapshot(run_dir, scenario.skip), time.monotonic() - start, writes)
        return cache[name]

    return get


def _kill_cases(name: str, kills: int, first_seed: int, references, tiny_pipe_dir, workdir, monkeypatch) -> None:
    """Kill-and-resume cases of scenario ``name`` from ``first_seed`` on until ``kills`` kills.

    A case kills once or twice (the second time, the re-run of the first kill's command or
    a later command), then runs to completion and compares with the reference.
    """
    scenario = SCENARIOS[name]
    outputs = workdir / "ref"  # the same paths as the reference: configs and paths compare equal
    monkeypatch.setenv("DIFFMEM_OUTPUTS", str(outputs))
    ref = references(name)
    commands = scenario.commands(tiny_pipe_dir, outputs)
    run_dir = _run_dir(outputs, commands[0])
    logs = workdir / "logs" / name
    done, seed = 0, first_seed
    while done < kills:
        assert seed < first_seed + 3 * kills, f"{name}: only {done} of {kills} kill points were hit"
        rng = np.random.default_rng(seed)
        shutil.rmtree(run_dir, ignore_errors=True)
        position, hits = 0, []  # commands before ``position`` are complete
        for _ in range(int(rng.integers(1, 3))):
            victim, point = scenario.draw(rng, ref)
            victim = max(victim, position)
            for i in range(position, victim):
                run_stage(*commands[i], run_dir, logs / f"{seed}-{i}.log")
            position = victim
            if run_stage(*commands[victim], run_dir, logs / f"{seed}-{victim}.log", kill=point):
                hits.append(f"command {victim} at {point}")
                assert_all_readable(run_dir, f"{name} seed={seed}: SIGKILLs of {'; '.join(hits)}")
        context = f"{name} seed={seed}: SIGKILLs of {'; '.join(hits) or 'none (all missed)'}"
        for i in range(position, len(commands)):  # the killed command is re-run
            run_stage(*commands[i], run_dir, logs / f"{seed}-{i}-resume.log")
        assert_all_readable(run_dir, context)
        assert_same_outputs(snapshot(run_dir, scenario.skip), ref.outputs, context)
        done += len(hits)
        KILLS["checked"] += len(hits)
        seed += 1


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_kill_and_resume(name, references, tiny_pipe_dir, workdir, monkeypatch):
    """A random SIGKILL or two per stage and a resume equal to the reference."""
    _kill_cases(name, 2 if name == "generate" else 1, 0, references, tiny_pipe_dir, workdir, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,kills",
    [
        ("generate", 5),
        ("embed", 4),
        ("index-single", 3),
        ("index-sharded", 5),
        ("index-merge", 3),
        ("search", 3),
        ("train", 5),
        ("mitigate-finetune", 3),
        ("mitigate-adversarial", 3),
    ],
)
def test_many_kills_and_resumes(name, kills, references, tiny_pipe_dir, workdir, monkeypatch):
    """At least 34 random SIGKILLs across the stages (seeds 1000 on), resumed and compared."""
    _kill_cases(name, kills, 1000, references, tiny_pipe_dir, workdir, monkeypatch)


def test_killed_memcontrol_study_resumes(tiny_pipe_dir, workdir, monkeypatch):
    """SIGKILL MemControl's Optuna study (a Hydra multirun, SQLite storage) once its second
    trial has published its objectives, then re-launch the same command: the finished trials
    are kept, only the missing ones run, and every stored value is its trial's objectives.json."""
    from diffmem.mitigations.memcontrol import completed_trials, study_table
    from diffmem.runs import read_json

    outputs = workdir / "study"
    monkeypatch.setenv("DIFFMEM_OUTPUTS", str(outputs))
    args = [
        "experiment=memcontrol",
        *MITIGATE,
        f"model.path={tiny_pipe_dir}",
        "mitigation.steps=3",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.population_size=2",
        "total_trials=4",
    ]
    sweep, logs = outputs / "mitigate" / "multirun" / "memcontrol", workdir / "logs" / "study"
    storage = f"sqlite:///{outputs / 'mitigate' / 'multirun' / 'memcontrol.db'}"
    assert run_stage("mitigate", args, sweep, logs / "killed.log", kill=KillPoint("trial-*/objectives.json", 2))
    assert_all_readable(sweep, "memcontrol study killed after its second trial")
    assert 1 <= completed_trials(storage, "memcontrol-local") < 4
    assert not run_stage("mitigate", args, sweep, logs / "resumed.log")
    table = study_table(storage, "memcontrol-local")
    assert len(table) == 4
    published = {(o["memorisation"], o["fd"]) for o in (read_json(p) for p in sweep.glob("trial-*/objectives.json"))}
    assert set(zip(table["memorisation"], table["fd"])) <= published
    KILLS["checked"] += 1


def _blocked_on(lock: Path) -> int:
    """How many processes wait for a flock on ``lock`` (``/proc/locks``: waiters are ``->`` lines)."""
    inode = f":{lock.stat().st_ino} "
    return sum(line.split()[1] == "->" and inode in line for line in Path("/proc/locks").read_text().splitlines())


def test_concurrent_claims_with_two_configs(tmp_path):
    """Two ``diffmem search`` runs of one run dir with different configs, released at once onto
    its claim lock (held by the test until both wait for it): exactly one claims the run dir
    and completes; the other is refused with one error line (exit 2) and changes nothing."""
    import fcntl
    import subprocess
    import sys

    from tests.reliability.test_bad_inputs import _embed_dir, _unit

    ref = _embed_dir(tmp_path / "ref", [_unit(12, 8)])
    q = _embed_dir(tmp_path / "q", [_unit(3, 8, 1)])
    outputs = tmp_path / "outputs"
    lock = outputs / "search" / ".x.lock"  # runs.claim's lock file of run dir outputs/search/x
    lock.parent.mkdir(parents=True)
    env = {**os.environ, "DIFFMEM_OUTPUTS": str(outputs), "OMP_NUM_THREADS": "1"}
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "diffmem.cli",
                    "search",
                    f"stream_dir={ref}",
                    f"queries_dir={q}",
                    "name=x",
                    f"k={k}",
                ],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k in (2, 3)
        ]
        deadline = time.monotonic() + 120
        while _blocked_on(lock) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                p.communicate() for p in procs if p.poll() is not None
            ]
            time.sleep(0.05)
        assert not (outputs / "search" / "x" / "run.json").exists()  # both wait to claim it
    outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in outs)
    assert codes == [0, 2], outs
    winner = next(i for i, (code, _, _) in enumerate(outs) if code == 0)
    refused = outs[1 - winner][2].strip()
    assert "\n" not in refused and "Traceback" not in refused, refused
    assert refused.startswith("diffmem search: error: ") and "holds a run with another config" in refused
    assert f"k: {(2, 3)[winner]} there, {(2, 3)[1 - winner]} now" in refused, refused
    from diffmem.runs import read_json

    assert read_json(outputs / "search" / "x" / "run.json")["k"] == (2, 3)[winner]
    assert (outputs / "search" / "x" / "_SUCCESS").exists()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_damaged_output_of_a_finished_run_is_recomputed(name, references, tiny_pipe_dir, workdir, monkeypatch):
    """A finished run with one published file deleted, then one cut short (seeded picks among the
    files its ``_SUCCESS`` lists): re-running its commands recomputes them, equal to the reference."""
    scenario = SCENARIOS[name]
    outputs = workdir / "ref"
    monkeypatch.setenv("DIFFMEM_OUTPUTS", str(outputs))
    ref = references(name)
    commands = scenario.commands(tiny_pipe_dir, outputs)
    run_dir = _run_dir(outputs, commands[0])
    for command in commands:  # finished (a no-op where an earlier test left it so)
        diffmem.run(*command)
    listed = sorted(json.loads((run_dir / "_SUCCESS").read_text())["outputs"])
    rng = np.random.default_rng(sum(map(ord, name)))
    for damage in ("delete", "cut short"):
        victim = run_dir / listed[int(rng.integers(len(listed)))]
        if damage == "delete":
            victim.unlink()
        else:
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        for command in commands:
            diffmem.run(*command)
        context = f"{name}: {victim.relative_to(run_dir)} {damage}"
        assert_all_readable(run_dir, context)
        assert_same_outputs(snapshot(run_dir, scenario.skip), ref.outputs, context)
