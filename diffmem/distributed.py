"""Data parallelism across processes: this process's rank, barriers that fail instead of
hanging, the rows of a job each rank takes, and the gradient and result exchanges.

A stage started by ``accelerate launch``, ``torchrun``, submitit/SLURM with several tasks or
``mpirun`` runs as ``WORLD_SIZE`` processes. They split the rows of a global batch (training)
or of the plan (sampling, embedding) so that the result is what one process computes: every random
draw still comes from ``(seed, phase, step)`` or the row's own seed, and each rank keeps its
share. Rank 0 alone claims the run dir, checkpoints and publishes; the others wait for it at
barriers that time out (``DIFFMEM_DIST_TIMEOUT_S``, default 1800 s), so a rank that dies or
hangs ends the job with one line (:class:`RankError`) instead of a silent wait. A stage whose
libraries sample (detectors, replication tables, trigger searches) runs its body inside
:func:`split`, where each :func:`deal` gives every rank its share of the rows and all ranks
the results. One process (no launcher) is world size 1: every function here is then a no-op
or the identity.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from diffmem.errors import ConfigError, DiffmemError

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

T = TypeVar("T")

#: seconds a rank waits for the others at a barrier or collective before failing the job
TIMEOUT_ENV = "DIFFMEM_DIST_TIMEOUT_S"
_BUCKET = 2**22  # gradient elements per all-reduce (16 MB of fp32), as DDP's buckets
_barrier_group: ProcessGroup | None = None
log = logging.getLogger(__name__)


class RankError(DiffmemError):
    """Another rank of a data-parallel job died, hangs or failed: this one stops too."""


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int


def _submitit_env() -> None:
    """Under submitit with several tasks (``hydra/launcher=slurm`` with ``tasks_per_node`` or
    ``nodes`` > 1, or ``submitit_local``), export torch's ``env://`` variables (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) from the job's environment."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


#: torch's ``env://`` variables and the names MPI launchers give them (MPICH/Intel MPI,
#: Open MPI, MVAPICH), in the order accelerate's ``get_cpu_distributed_information`` reads them
_MPI_VARS = {
    "RANK": ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"),
    "WORLD_SIZE": ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"),
    "LOCAL_RANK": ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
    "LOCAL_WORLD_SIZE": ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"),
}


def _mpi_env() -> None:
    """Under ``mpirun``/``mpiexec`` (``accelerate launch --cpu --mpirun_hostfile``), export
    torch's ``env://`` variables from MPI's, as accelerate's ``PartialState`` does:
    ``MASTER_PORT`` 29500 and, when every rank is on this node, ``MASTER_ADDR`` 127.0.0.1
    unless set (several nodes need rank 0's host name in ``MASTER_ADDR``)."""
    env = os.environ
    if "RANK" in env:
        return
    mpi = {key: next((env[name] for name in names if name in env), None) for key, names in _MPI_VARS.items()}
    if mpi["RANK"] is None or int(mpi["WORLD_SIZE"] or 1) <= 1:
        return
    given = {key: value for key, value in mpi.items() if value is not None}
    if "MASTER_ADDR" not in env:
        if int(given.get("LOCAL_WORLD_SIZE", given["WORLD_SIZE"])) != int(given["WORLD_SIZE"]):
            raise ConfigError(
                f"MPI job of {given['WORLD_SIZE']} ranks on several nodes: "
                "export MASTER_ADDR=<rank 0's host name> for every rank (mpirun -x MASTER_ADDR)"
            )
        env["MASTER_ADDR"] = "127.0.0.1"
    env.setdefault("MASTER_PORT", "29500")
    env.update(given)


def _accelerate_cpu() -> bool:
    """Whether ``accelerate launch --cpu`` started this process."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def _accelerate_num_processes(argv: list[str] | None = None) -> tuple[int, int, int]:
    """``(num_processes, num_machines, machine_rank)`` of the ``accelerate launch`` command line
    ``argv`` (by default the parent process's: accelerate's simple launcher, taken for ``--cpu``,
    passes neither to the script); ``(1, 1, 0)`` when it is no ``accelerate launch``."""
    if argv is None:
        try:
            argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
        except OSError:
            return 1, 1, 0
    if "launch" not in argv or not any(Path(a).name == "accelerate" for a in argv[: argv.index("launch")]):
        return 1, 1, 0
    from accelerate.commands.config import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(argv[argv.index("launch") + 1 :])
    except SystemExit:
        return 1, 1, 0
    if args.config_file is not None:  # accelerate reads a config file given with --cpu
        config = load_config_from_file(args.config_file)
        for key in ("num_processes", "num_machines", "machine_rank"):
            if getattr(args, key) is None:
                setattr(args, key, getattr(config, key))
    return int(args.num_processes or 1), int(args.num_machines or 1), int(args.machine_rank or 0)


def relaunch_cpu_ranks() -> None:
    """Start ``--num_processes`` ranks when ``accelerate launch --cpu --num_processes N`` (N > 1,
    no ``--mpirun_hostfile``) started this one process: accelerate's ``--cpu`` launcher runs the
    script once and leaves the ranks to MPI. This process becomes torch's elastic launcher
    (``torch.distributed.run``, what ``--multi_gpu`` and ``torchrun`` use) over the same command,
    so the job runs N gloo ranks, on ``MASTER_ADDR:MASTER_PORT`` as accelerate set them."""
    env = os.environ
    under_mpi = any(name in env for name in _MPI_VARS["RANK"])
    if not _accelerate_cpu() or "MASTER_ADDR" not in env or "RANK" in env or under_mpi:
        return
    n, machines, machine_rank = _accelerate_num_processes()
    if n <= 1:
        return
    per_node = max(n // machines, 1)
    print(
        f"diffmem: accelerate launch --cpu --num_processes {n}: starting {per_node} gloo ranks on this node "
        "through torch.distributed.run",
        file=sys.stderr,
        flush=True,
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={machines}",
        f"--node_rank={machine_rank}",
        f"--nproc_per_node={per_node}",
        f"--master_addr={env['MASTER_ADDR']}",
        f"--master_port={env.get('MASTER_PORT', '29500')}",
        "--no-python",
        *sys.orig_argv,
    ]
    os.execv(sys.executable, cmd)


def ranks() -> Ranks:
    """This process's rank, the job's world size and the rank on this node (from
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, set by accelerate, torchrun and, through
    :func:`_submitit_env` and :func:`_mpi_env`, submitit and MPI)."""
    _submitit_env()
    _mpi_env()
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def world_size() -> int:
    return ranks().world_size


def is_main() -> bool:
    """Whether this process publishes (rank 0, or the only process)."""
    return ranks().rank == 0


def single_process(stage: str) -> None:
    """Refuse a data-parallel start of a stage that does not split its rows across ranks yet
    (each rank would redo the whole stage into the same run dir)."""
    r = ranks()
    if r.world_size > 1:
        raise ConfigError(
            f"{stage} runs as one process (started as rank {r.rank} of {r.world_size}): "
            "run it without accelerate/torchrun/tasks_per_node"
        )


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, 1800))


def init() -> bool:
    """Join the job's process group (once; gloo on the CPU, NCCL on CUDA) with the barrier
    timeout; returns whether the job has several processes (one process: torch is not imported)."""
    r = ranks()
    if r.world_size == 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and not _accelerate_cpu() else "gloo"
        try:
            dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s()))
        except (RuntimeError, ValueError) as err:  # the store's rendezvous timed out, a bad address
            raise RankError(
                f"rank {r.rank} of {r.world_size}: cannot join the job's process group ({str(err).splitlines()[0]})"
            ) from err
        atexit.register(_leave)
    return True


def _leave() -> None:
    """Destroy the process groups before the interpreter tears down (their worker threads
    otherwise end in ``std::terminate`` at exit, a rank's non-zero status after its work is done)."""
    import torch.distributed as dist

    global _barrier_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _barrier_group = None


def _gloo_group() -> ProcessGroup | None:
    """The process group of barriers and object exchanges: gloo, whose ``monitored_barrier``
    names the missing ranks (the main group is NCCL on GPUs)."""
    global _barrier_group
    import torch.distributed as dist

    if _barrier_group is None:
        _barrier_group = (
            dist.group.WORLD
            if dist.get_backend() == "gloo"
            else dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout_s()))
        )
    return _barrier_group


def _collective(what: str, fn: Callable[[], T]) -> T:
    """Run collective ``fn``; a peer that died, hangs or failed is a :class:`RankError` naming ``what``."""
    r = ranks()
    try:
        return fn()
    except RuntimeError as err:  # gloo/NCCL: "[file:line] Connection closed by peer ...", "Timed out ..."
        cause = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0]).split(". ")[0][:160]
        raise RankError(
            f"rank {r.rank} of {r.world_size}: another rank died, failed or hangs ({what}: {cause}); the job stops"
        ) from err


def barrier(what: str, timeout: float | None = None) -> None:
    """Wait until every rank gets here (``what`` names the place in the error), at most
    ``timeout`` seconds (default :func:`timeout_s`)."""
    if not init():
        return
    import torch.distributed as dist

    seconds = timeout_s() if timeout is None else float(timeout)
    _collective(
        f"barrier '{what}' ({seconds:.0f} s)",
        lambda: dist.monitored_barrier(_gloo_group(), timeout=_dt.timedelta(seconds=seconds), wait_all_ranks=True),
    )


def shard_rows(n: int, block: int = 1, rank: int | None = None, world: int | None = None) -> np.ndarray:
    """The indices of this rank's rows of ``n``: blocks of ``block`` consecutive rows are dealt
    round-robin (block ``b`` to rank ``b % world``), so a batched computation keeps the
    batches one process forms. Deterministic; every row goes to exactly one rank."""
    r = ranks()
    rank, world = r.rank if rank is None else rank, r.world_size if world is None else world
    rows = (np.arange(rank, -(-n // block), world)[:, None] * block + np.arange(block)).ravel()
    return rows[rows < n]


def batch_rows(n: int, rank: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of a global batch of ``n`` rows (sizes differ by at most one)."""
    r = ranks()
    rank, world = r.rank if rank is None else rank, r.world_size if world is None else world
    return slice(rank * n // world, (rank + 1) * n // world)


def batch_mean(per_row: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the global batch's (``weight``-ed) mean of ``per_row`` (this rank's
    rows), scaled so that gradients averaged over ranks (:func:`average_gradients`) are those
    of the global mean. One process: the plain (weighted) mean."""
    import torch
    import torch.distributed as dist

    world = world_size()
    if world == 1 and weight is None:
        return per_row.mean()
    weight = torch.ones_like(per_row) if weight is None else weight.to(per_row.dtype)
    total = weight.sum().detach()
    if world > 1 and init():
        total = total.clone()
        _collective("batch weight", lambda: dist.all_reduce(total))
    return (per_row * weight).sum() * world / total.clamp(min=1)


def batch_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean squared error of the global batch, this rank's share (:func:`batch_mean` of the
    per-row errors of this rank's rows); one process: exactly ``mse_loss`` as it always was."""
    import torch

    if world_size() == 1:
        return torch.nn.functional.mse_loss(pred, target)
    return batch_mean((pred - target).pow(2).flatten(1).mean(1))


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks (DDP's all-reduce, in buckets)."""
    if world_size() == 1 or not init():
        return
    import torch
    import torch.distributed as dist

    for p in params:  # a rank with no rows this step still takes part
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [cast("torch.Tensor", p.grad) for p in params]  # every one set above
    world = world_size()
    bucket: list[torch.Tensor] = []
    for i, g in enumerate(grads):
        bucket.append(g)
        if i + 1 == len(grads) or sum(x.numel() for x in bucket) >= _BUCKET:
            flat = torch.cat([x.reshape(-1) for x in bucket])
            _collective("gradient all-reduce", partial(dist.all_reduce, flat))
            flat /= world
            offset = 0
            for x in bucket:
                x.copy_(flat[offset : offset + x.numel()].view_as(x))
                offset += x.numel()
            bucket = []


def mean_over_ranks(value: float) -> float:
    """``value`` averaged over the ranks (a logged loss: each rank holds its share)."""
    if world_size() == 1 or not init():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    _collective("loss all-reduce", lambda: dist.all_reduce(t, group=_gloo_group()))
    return float(t) / world_size()


def share(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. whether the others have work); ``obj`` in one process."""
    if not init():
        return obj
    import torch.distributed as dist

    box = [obj]
    _collective("share", lambda: dist.broadcast_object_list(box, src=0, group=_gloo_group()))
    return box[0]


def summary(items: Callable[[int, int], int]) -> dict[str, Any]:
    """What ``info.json`` records of the job's data parallelism: the world size and each rank's
    item count (``items(rank, world)``)."""
    world = world_size()
    return {"world_size": world, "rank_items": [int(items(r, world)) for r in range(world)]}


#: while a data-parallel stage's body splits its work (:func:`split`): rows dealt to this rank so
#: far (None: not splitting), and whether this rank is inside a dealt unit (which it runs alone)
_split: dict[str, Any] = {"rows": None, "alone": False}


@contextlib.contextmanager
def split() -> Iterator[None]:
    """Inside, :func:`deal` splits rows across the ranks: for the body of a data-parallel stage
    in which every rank runs the same code (detect, probe, evaluate-mitigation). Outside it every
    ``deal`` runs all its rows here, so code that one rank runs alone (a fine-tune's objectives)
    never waits for the others."""
    _split.update(rows=0, alone=False)
    try:
        yield
    finally:
        _split.update(rows=None, alone=False)


def splitting() -> bool:
    """Whether a :func:`deal` here splits its rows across the ranks."""
    return _split["rows"] is not None and not _split["alone"] and world_size() > 1


def writes() -> bool:
    """Whether this process writes the outputs of the work in hand: rank 0 while the ranks split
    it (they all hold the same results), the rank that runs a dealt unit, every process otherwise."""
    return not splitting() or is_main()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank, in rank order; ``[obj]`` for one process."""
    if not init():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    _collective("all-gather", lambda: dist.all_gather_object(out, obj, group=_gloo_group()))
    return out


def deal(n: int, compute: Callable[[np.ndarray], Any], block: int = 1) -> Any:
    """``compute(rows)`` for the rows ``0..n-1``: inside :func:`split`, each rank computes its
    rows (:func:`shard_rows`: blocks of ``block`` dealt round-robin, so a computation batched by
    ``block`` keeps one process's batches) and every rank gets all ``n`` results in row order.

    ``compute`` returns one result per row: a list, an array or a tensor (first dimension). It
    runs alone on its rank: a ``deal`` inside it runs all its rows here, and :func:`writes` is
    true there. Outside ``split()`` (or one process): ``compute(arange(n))``."""
    if _split["rows"] is None or _split["alone"] or n == 0:
        return compute(np.arange(n))
    rows = shard_rows(n, block)
    _split["rows"] += len(rows)
    _split["alone"] = True
    try:
        mine = compute(rows) if len(rows) else None
    finally:
        _split["alone"] = False
    if world_size() == 1:
        return mine
    parts = [(r, m) for r, m in all_gather((rows, mine)) if len(r)]
    order = np.argsort(np.concatenate([r for r, _ in parts]), kind="stable")
    return _in_order([m for _, m in parts], order)


def _in_order(parts: list[Any], order: np.ndarray) -> Any:
    """The ranks' results ``parts`` (in rank order) concatenated, then taken in ``order``."""
    first = parts[0]
    if isinstance(first, list):
        flat = [x for p in parts for x in p]
        return [flat[i] for i in order]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)[order]
    import torch

    return torch.cat(parts)[torch.as_tensor(order)]


def dealt_summary() -> dict[str, Any]:
    """What ``info.json`` records of a :func:`split` body: the world size and the rows
    :func:`deal` gave each rank (every rank calls it: a collective)."""
    counts = all_gather(int(_split["rows"] or 0))
    return {"world_size": len(counts), "rank_items": counts}
