"""Data parallelism (:mod:`diffmem.distributed`): the rows each rank takes, ranks from the
launchers' environments, and jobs of two CPU processes (gloo) that give what one process
gives, end with one line when a rank dies or hangs, and resume after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from diffmem import distributed as dist
from tests.conftest import SMALL_DATA

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("n,block,world", [(0, 1, 2), (10, 1, 3), (10, 3, 2), (7, 4, 4), (5, 8, 2)])
def test_shard_rows_deal_every_row_to_one_rank_in_whole_blocks(n, block, world):
    shards = [dist.shard_rows(n, block, r, world) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    for rows in shards:  # whole blocks of consecutive rows, as one process batches them
        assert all(set(rows) >= set(range(b * block, min(n, (b + 1) * block))) for b in set(rows // block))


@pytest.mark.parametrize("n,world", [(4, 2), (5, 2), (3, 4), (32, 8)])
def test_batch_rows_split_a_global_batch(n, world):
    parts = [dist.batch_rows(n, r, world) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_one_process_is_rank_0_of_1(monkeypatch):
    for key in LAUNCH_VARS + ("SUBMITIT_EXECUTOR",):
        monkeypatch.delenv(key, raising=False)
    assert dist.ranks() == dist.Ranks(0, 1, 0) and dist.is_main() and not dist.init()
    dist.barrier("nothing to wait for")
    assert dist.all_gather({"a": 1}) == [{"a": 1}]


def test_submitit_tasks_become_torch_ranks(monkeypatch):
    for key in LAUNCH_VARS + ("LOCAL_WORLD_SIZE",):  # restored after the test: export sets them
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for key, value in {"NTASKS": "2", "GLOBALID": "1", "LOCALID": "1", "JOB_ID": "4242", "JOB_NUM_NODES": "1"}.items():
        monkeypatch.setenv(f"SUBMITIT_LOCAL_{key}", value)
    assert dist.ranks() == dist.Ranks(1, 2, 1) and not dist.is_main()
    assert os.environ["MASTER_ADDR"] and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000


MPI_VARS = [name for names in dist._MPI_VARS.values() for name in names]


@pytest.mark.parametrize(
    "mpi",
    [
        {
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        },
        {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "node0"},
        {"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "3", "MV2_COMM_WORLD_LOCAL_RANK": "0"},
    ],
)
def test_mpi_ranks_become_torch_ranks_as_accelerate_reads_them(monkeypatch, mpi):
    from accelerate.utils.environment import get_cpu_distributed_information

    for key in LAUNCH_VARS + ("LOCAL_WORLD_SIZE", "SUBMITIT_EXECUTOR", *MPI_VARS):  # restored after the test
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    for key, value in mpi.items():
        monkeypatch.setenv(key, value)
    acc = get_cpu_distributed_information()  # what accelerate's PartialState makes of the same job
    assert dist.ranks() == dist.Ranks(acc.rank, acc.world_size, acc.local_rank) and acc.world_size > 1
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == (str(acc.rank), str(acc.world_size))
    assert os.environ["MASTER_ADDR"] == mpi.get("MASTER_ADDR", "127.0.0.1") and os.environ["MASTER_PORT"] == "29500"


def test_an_mpi_job_on_several_nodes_needs_master_addr(monkeypatch):
    from diffmem.errors import ConfigError

    for key in LAUNCH_VARS + ("SUBMITIT_EXECUTOR", *MPI_VARS):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="export MASTER_ADDR"):
        dist.ranks()
    monkeypatch.setenv("PMI_SIZE", "1")  # one MPI rank is one process
    assert dist.ranks() == dist.Ranks(0, 1, 0) and "RANK" not in os.environ


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["/v/bin/python", "/v/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "diffmem.train"],
            (2, 1, 0),
        ),
        (
            [
                "/v/bin/accelerate",
                "launch",
                "--cpu",
                "--num_processes=4",
                "--num_machines=2",
                "--machine_rank=1",
                "--main_process_ip=10.0.0.1",
                "x.py",
                "--num_processes",
                "8",
            ],
            (4, 2, 1),
        ),  # the script's own args do not count
        (["/v/bin/accelerate", "launch", "--cpu", "-m", "diffmem.generate"], (1, 1, 0)),
        (["/v/bin/python", "-m", "diffmem.train", "launch"], (1, 1, 0)),  # no accelerate launch
    ],
)
def test_the_ranks_accelerate_cpu_was_asked_for_come_from_its_command_line(argv, expected):
    assert dist._accelerate_num_processes(argv) == expected


def test_accelerate_cpu_reads_num_processes_from_its_config_file(tmp_path):
    config = tmp_path / "cpu.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 3\n"
        "num_machines: 1\nmachine_rank: 0\nuse_cpu: true\nmixed_precision: 'no'\n"
    )
    argv = ["/v/bin/accelerate", "launch", "--cpu", "--config_file", str(config), "-m", "diffmem.train"]
    assert dist._accelerate_num_processes(argv) == (3, 1, 0)


@pytest.mark.parametrize("stage", ["dedup", "index", "search", "audit", "generalise"])
def test_stages_that_do_not_split_refuse_several_ranks(monkeypatch, stage):
    import diffmem
    from diffmem.errors import ConfigError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=f"{stage} runs as one process \\(started as rank 1 of 2\\)"):
        diffmem.run(stage, [])


def _as_two_ranks(monkeypatch, fn):
    """``fn()`` (one :func:`dist.deal`) inside :func:`dist.split` as rank 1 of a job of 2, in this
    process, up to the deal's gather (what rank 1 sends), then as rank 0, whose gathers get rank
    1's share and row count. Returns rank 0's result and its :func:`dist.dealt_summary`."""

    class Sent(Exception):
        pass

    sent = []

    def rank_1(obj):
        sent.append(obj)
        raise Sent

    def rank_0(obj):
        return [obj, sent[0] if isinstance(obj, tuple) else len(sent[0][0])]

    for rank, gather in ((1, rank_1), (0, rank_0)):
        monkeypatch.setattr(dist, "ranks", lambda rank=rank: dist.Ranks(rank, 2, rank))
        monkeypatch.setattr(dist, "all_gather", gather)
        with dist.split():
            if rank == 1:
                with pytest.raises(Sent):
                    fn()
            else:
                out = fn(), dist.dealt_summary()
    assert not dist.splitting()
    return out


def test_split_scores_and_generations_are_the_bits_of_one_process(tiny_pipe, monkeypatch, tmp_path):
    """Dealt in whole batches, each rank forms the batches one process forms: scores, generations,
    their PNGs and the searched triggers are the same bits, in the same order."""
    from diffmem.detectors.noise_norm import NoiseNorm
    from diffmem.features import build_extractor
    from diffmem.probes.replication import replication_table
    from diffmem.probes.trigger import image_latents, search_triggers
    from diffmem.sampling import encode_prompts

    captions = ["a red circle", "the zorblax emblem", "two green triangles", "a vintage poster", "grey", "blue", "x"]
    ids = [5, 3, 8, 1, 9, 2, 7]
    detector = NoiseNorm(steps=[0, 1], n_generations=2, num_inference_steps=4, guidance_scale=3.0)
    assert detector.prompt_block(3) == 3  # 6 rows: 2 batches of 3 rows, 3 whole prompts

    def score():
        return detector.score(tiny_pipe, captions, ids, resolution=32, batch_size=3)

    with dist.split():  # one process: every prompt here, scored as outside split()
        one = score()
        assert dist.dealt_summary() == {"world_size": 1, "rank_items": [7]}
    assert one.tobytes() == score().tobytes()
    two, summary = _as_two_ranks(monkeypatch, score)
    assert two.tobytes() == one.tobytes()
    assert summary == {"world_size": 2, "rank_items": [4, 3]}  # blocks of prompts [0-2] [6] to rank 0, [3-5] to 1

    cond = encode_prompts(tiny_pipe, captions[:3])
    targets = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    keys = pd.DataFrame({"prompt_id": ids[:3], "caption": captions[:3]})
    settings = dict(n_per_prompt=2, seed=0, resolution=32, steps=3, guidance=3.0, batch_size=4)

    def replicate(where):
        return lambda: replication_table(
            tiny_pipe, build_extractor("pixel", size=8), cond, targets, keys, **settings, image_dir=tmp_path / where
        )

    one = replicate("one")()
    two, summary = _as_two_ranks(monkeypatch, replicate("two"))
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert summary == {"world_size": 2, "rank_items": [4, 2]}  # batches [0-3] [4-5]: 4 + 2 rows
    assert [(tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in one["image"]] == [
        True
    ] * 6

    x0 = image_latents(tiny_pipe, targets[:1])
    search = dict(prompt_id=5, restarts=3, inits=["prompt", "random"], steps=2, batch_size=2)
    one = search_triggers(tiny_pipe, x0, cond[0], **search)
    two, summary = _as_two_ranks(monkeypatch, lambda: search_triggers(tiny_pipe, x0, cond[0], **search))
    assert [t.init for t in two] == ["prompt", "random", "prompt"] and summary["rank_items"] == [2, 1]
    assert all(torch.equal(a.embedding, b.embedding) and a.losses == b.losses for a, b in zip(one, two))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(cmd: list[str], world: int = 2, **extra) -> list[subprocess.Popen]:
    """``cmd`` started as the ranks of one job with no launcher agent watching them (as
    SLURM's ``srun`` starts tasks): only diffmem's own timeouts stop a rank that waits."""
    port = str(_free_port())
    return [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                **extra,
            ),
        )
        for r in range(world)
    ]


def _finish(procs, timeout=300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    return out


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    scale = max(float(v.float().abs().max()) for v in a.values())
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) / scale


def test_two_processes_fit_what_one_process_fits(tmp_path):
    from tests.dp_worker import initial_model, main

    main(tmp_path / "one")
    done = _finish(_ranks([sys.executable, "-m", "tests.dp_worker", str(tmp_path / "two")]))
    assert [rc for rc, _ in done] == [0, 0], done
    one, two = load_file(tmp_path / "one" / "w.safetensors"), load_file(tmp_path / "two" / "w.safetensors")
    assert _max_rel_diff(one, two) <= 1e-4  # equal up to float summation order
    assert _max_rel_diff(one, initial_model().state_dict()) > 1e-3  # the comparison can fail: the weights moved


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_dead_or_hung_rank_ends_the_job_with_one_line(tmp_path, how):
    procs = _ranks([sys.executable, "-m", "tests.dp_worker", str(tmp_path), "3", how], DIFFMEM_DIST_TIMEOUT_S="5")
    start = time.monotonic()
    try:
        ((rc0, err0),) = _finish(procs[:1], timeout=120)
    finally:
        procs[1].kill()
    assert rc0 == 2 and time.monotonic() - start < 120
    lines = [line for line in err0.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 of 2: another rank died, failed or hangs"), err0
    assert not (tmp_path / "w.safetensors").exists() and (tmp_path / "ckpt" / "step-0000002").is_dir()


# ---- stages under the launchers (slow: each process imports diffmem and builds its pipeline) ----

TRAIN = [
    "arch=tiny",
    "unet.steps=10",
    "unet.batch_size=4",
    "unet.lr=1e-3",
    "unet.ckpt_every=2",
    "vae.steps=2",
    "vae.batch_size=4",
    "vae.ckpt_every=1",
    "threads=1",
    *SMALL_DATA,
]


def _launch(launcher: list[str], stage: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*launcher, "-m", f"diffmem.{stage}", *args], cwd=ROOT, env=_env(), text=True, capture_output=True, timeout=600
    )


#: the command the issue names: accelerate's --cpu launcher starts one process, which starts the ranks
ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2"]
ACCELERATE_MULTI_GPU = [
    str(Path(sys.executable).parent / "accelerate"),
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
]
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2"]


def _data_parallel(run_dir: Path) -> dict:
    return json.loads((run_dir / "info.json").read_text())["data_parallel"]


@pytest.mark.slow
def test_train_on_two_ranks_equals_one_process_and_resumes_after_a_rank_is_killed():
    import diffmem

    one = diffmem.run("train", TRAIN + ["name=one"])
    two = _launch(ACCELERATE, "train", TRAIN + ["name=two"])
    assert two.returncode == 0, two.stderr[-2000:]
    out = Path(os.environ["DIFFMEM_OUTPUTS"]) / "train"
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    assert _max_rel_diff(load_file(one / weights), load_file(out / "two" / weights)) <= 1e-4
    assert _data_parallel(out / "two") == {"world_size": 2, "rank_items": [24, 24]}  # (2 + 10 steps) x 2 rows

    # SIGKILL rank 1 once a checkpoint is written, then relaunch: the same weights
    procs = _ranks([sys.executable, "-m", "diffmem.train", *TRAIN, "name=killed"], DIFFMEM_DIST_TIMEOUT_S="20")
    ckpt = out / "killed" / "checkpoints" / "unet" / "step-0000004"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and time.monotonic() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    (rc0, err0), _ = _finish(procs)
    assert rc0 == 2 and "diffmem train: error: rank 0 of 2: another rank died" in err0 and "Traceback" not in err0
    assert not (out / "killed" / "_SUCCESS").exists()
    again = _launch(TORCHRUN, "train", TRAIN + ["name=killed"])
    assert again.returncode == 0 and "unet: resuming from step" in again.stdout + again.stderr, again.stderr[-2000:]
    assert _max_rel_diff(load_file(one / weights), load_file(out / "killed" / weights)) <= 1e-4


@pytest.mark.slow
def test_lora_mitigation_on_two_ranks_equals_one_process():
    import diffmem

    args = [
        "mitigation=lora",
        "mitigation.steps=4",
        "mitigation.batch_size=6",
        "mitigation.ckpt_every=2",
        "mitigation.objectives=false",
        "threads=1",
    ]
    one = diffmem.run("mitigate", args + ["name=one"])
    two = _launch(ACCELERATE, "mitigate", args + ["name=two"])
    assert two.returncode == 0, two.stderr[-2000:]
    two_dir = one.parent / "two"
    a, b = load_file(one / "model" / "lora.safetensors"), load_file(two_dir / "model" / "lora.safetensors")
    assert _max_rel_diff(a, b) <= 1e-4
    assert _data_parallel(two_dir) == {"world_size": 2, "rank_items": [12, 12]}


def _outputs(run_dir: Path) -> dict[str, bytes]:
    """Every published file but those naming the run (Hydra's, the log, ``info.json`` with the
    world size and date, and ``_SUCCESS`` listing its digest)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.name not in ("info.json", "config.log", "_SUCCESS")
    }


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "accelerate_multi_gpu", "submitit_local", "mpirun"])
def test_generate_on_two_ranks_writes_the_same_bytes(launcher, tmp_path, monkeypatch):
    import diffmem

    if launcher == "mpirun" and not shutil.which("mpirun"):
        pytest.skip("no mpirun (an OS package: apt-get install openmpi-bin)")
    args = ["prompts.n_ordinary=3", "prompts.n_heldout=2", "n_per_prompt=2", "batch_size=3", "steps=4", "threads=1"]
    one = diffmem.run("generate", args + ["name=one"])
    if launcher in ("accelerate", "accelerate_multi_gpu", "mpirun"):
        if launcher == "mpirun":  # accelerate launch --cpu runs mpirun given a host file
            (tmp_path / "hosts").write_text("localhost slots=2\n")
            monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")  # Open MPI refuses root (CI containers) without both
            monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        two = _launch(
            {"accelerate": ACCELERATE, "accelerate_multi_gpu": ACCELERATE_MULTI_GPU}.get(
                launcher, [*ACCELERATE, "--mpirun_hostfile", str(tmp_path / "hosts")]
            ),
            "generate",
            args + ["name=two"],
        )
        two_dir = one.parent / "two"
    else:  # hydra/launcher=submitit_local with 2 tasks: submitit's environment becomes the ranks
        two = subprocess.run(
            [
                sys.executable,
                "-m",
                "diffmem.generate",
                "--multirun",
                "hydra/launcher=submitit_local",
                "hydra.launcher.tasks_per_node=2",
                *args,
                "name=two",
            ],
            cwd=ROOT,
            env=_env(),
            text=True,
            capture_output=True,
            timeout=600,
        )
        two_dir = one.parent / "multirun" / "two" / "0"
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _outputs(one), _outputs(two_dir)
    assert any(f.endswith(".png") for f in a) and a.keys() == b.keys()
    assert [f for f in a if a[f] != b[f]] == []
    items = _data_parallel(two_dir)["rank_items"]
    assert len(items) == 2 and sum(items) == sum(f.endswith(".png") for f in a) and min(items) > 0


@pytest.mark.slow
def test_embed_on_two_ranks_writes_the_same_vectors():
    import diffmem
    from tests.conftest import EMBED

    one = diffmem.run("embed", EMBED + ["name=one"])
    two = _launch(TORCHRUN, "embed", EMBED + ["name=two"])
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _outputs(one), _outputs(one.parent / "two")
    assert len(a) > 4 and a.keys() == b.keys() and [f for f in a if a[f] != b[f]] == []
    items = _data_parallel(one.parent / "two")["rank_items"]
    assert sum(items) == json.loads((one / "info.json").read_text())["n"] and min(items) > 0


@pytest.mark.slow
def test_a_run_refused_by_rank_0_stops_every_rank_with_one_line():
    import diffmem

    args = ["prompts.n_ordinary=2", "prompts.n_heldout=0", "n_per_prompt=1", "steps=2", "threads=1", "name=taken"]
    diffmem.run("generate", args)
    done = _finish(_ranks([sys.executable, "-m", "diffmem.generate", *args[:-3], "steps=3", "threads=1", "name=taken"]))
    for rank, (rc, err) in enumerate(done):
        lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert rc == 2 and len(lines) == 1, err
        assert "holds a run with another config (steps: 2 there, 3 now)" in lines[0]
        assert lines[0].startswith("diffmem generate: error: " + ("" if rank == 0 else "generate: rank 0 stopped: "))


def _same_metrics(one: Path, two: Path, timed=("seconds", "seconds_per_prompt", "provenance")) -> dict:
    """The metrics of two runs, equal but for their timings and provenance (returned: one's)."""
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for key in timed:
        a.pop(key, None), b.pop(key, None)
    assert a == b
    return a


@pytest.mark.slow
def test_detect_on_two_ranks_writes_what_one_process_writes(tiny_pipe_dir):
    import diffmem
    from tests.test_detect import _args

    # 2 generations per prompt in batches of 3 rows: blocks of 3 prompts (whole batches) per rank
    args = _args(tiny_pipe_dir, "detect.n_generations=2", "batch_size=3", "attribution=true", "threads=1")
    one = diffmem.run("detect", args + ["name=one"])
    two = _launch(TORCHRUN, "detect", args + ["name=two"])
    assert two.returncode == 0, two.stderr[-2000:]
    two_dir = one.parent / "two"
    a, b = _outputs(one), _outputs(two_dir)
    tables = ("scores.parquet", "attribution.parquet", "roc.png")
    assert all(a[f] == b[f] for f in tables) and a.keys() == b.keys()
    metrics = _same_metrics(one, two_dir)
    n = metrics["n_prompts"]
    assert n >= 6 and metrics["unet_calls"] == 2 * 2 * n  # every rank's UNet calls counted
    items = _data_parallel(two_dir)["rank_items"]
    assert sum(items) == 2 * n and min(items) > 0  # each prompt scored and attributed by one rank


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["finding_dori", "locality"])
def test_probe_on_two_ranks_writes_what_one_process_writes(tiny_pipe_dir, probe):
    import diffmem
    from tests.test_probe import COMMON, FAST, LOCALITY, _args

    # finding_dori: trigger restarts, generations in batches of 1, NeMo's and Wanda's targets dealt;
    # locality: NeMo's and Wanda's masks per trigger dealt
    study = ["experiment=finding_dori", *FAST] if probe == "finding_dori" else [*LOCALITY, *COMMON]
    args = _args(tiny_pipe_dir, *study, "batch_size=1", "threads=1")
    one = diffmem.run("probe", args + ["name=one"])
    two = _launch(TORCHRUN, "probe", args + ["name=two"])
    assert two.returncode == 0, two.stderr[-2000:]
    two_dir = one.parent / "two"
    a, b = _outputs(one), _outputs(two_dir)
    tables = {"triggers.parquet", "masks.safetensors", "model/model_index.json"} if probe == "finding_dori" else set()
    assert tables | {f"{probe}.parquet"} <= a.keys() and sum(f.endswith(".png") for f in a) >= 6
    assert a.keys() == b.keys() and [f for f in a if f != "metrics.json" and a[f] != b[f]] == []
    _same_metrics(one, two_dir)
    items = _data_parallel(two_dir)["rank_items"]
    assert len(items) == 2 and min(items) > 0
    if probe == "finding_dori":  # a damaged run resumes on 2 ranks from the parts that are left
        for path in (two_dir / "finding_dori.parquet", two_dir / "parts" / "attack-nemo-target-0.parquet"):
            path.unlink()
        next(two_dir.glob("parts/nemo-*.json")).unlink()
        again = _launch(TORCHRUN, "probe", args + ["name=two"])
        assert again.returncode == 0 and "recomputing it" in again.stdout + again.stderr, again.stderr[-2000:]
        b = _outputs(two_dir)
        assert a.keys() == b.keys() and [f for f in a if f != "metrics.json" and a[f] != b[f]] == []
        assert sum(_data_parallel(two_dir)["rank_items"]) < sum(items)  # the other parts were reused


@pytest.mark.slow
def test_evaluate_mitigation_on_two_ranks_writes_what_one_process_writes(tiny_pipe_dir):
    from threadpoolctl import threadpool_limits

    import diffmem
    from tests.test_evaluate_mitigation import COMMON, _mitigate

    gni = _mitigate(tiny_pipe_dir, "gni") / "model"  # a defence wrapper beside the plain model
    args = [f"models.original={tiny_pipe_dir}", f"+models.gni={gni}", *COMMON, "batch_size=2", "threads=1"]
    with threadpool_limits(1):  # one BLAS thread, as in the ranks (OMP_NUM_THREADS=1): the same Fréchet distance bits
        one = diffmem.run("evaluate-mitigation", args + ["name=one"])
    two = _launch(TORCHRUN, "evaluate_mitigation", args + ["name=two"])
    assert two.returncode == 0, two.stderr[-2000:]
    two_dir = one.parent / "two"
    a, b = _outputs(one), _outputs(two_dir)
    assert "mitigations.parquet" in a and sum(f.endswith(".png") for f in a) > 8 and a.keys() == b.keys()
    assert [f for f in a if f != "metrics.json" and a[f] != b[f]] == []
    _same_metrics(one, two_dir)
    items = _data_parallel(two_dir)["rank_items"]
    assert len(items) == 2 and min(items) > 0
