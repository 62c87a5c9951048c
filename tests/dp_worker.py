"""A data-parallel :func:`diffmem.training.fit` of a small linear model, run by
``tests/test_distributed.py`` as one process or as the ranks of a job.

``python -m tests.dp_worker OUT [STEP exit|hang]``: writes ``OUT/w.safetensors`` (rank 0); with
``STEP``, rank 1 dies (``os._exit``, as a killed or crashed rank) or hangs at that step.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffmem import distributed as dist
from diffmem.errors import DiffmemError
from diffmem.training import fit


def initial_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def main(out: Path, die_at: int | None = None, how: str = "exit") -> None:
    model = initial_model()
    x = torch.randn(64, 8)
    y = torch.sin(x.sum(1, keepdim=True))

    def loss_fn(step, g):
        if step == die_at and dist.ranks().rank == 1:
            os._exit(1) if how == "exit" else time.sleep(600)
        idx = torch.randint(64, (10,), generator=g)[dist.batch_rows(10)]
        return dist.batch_mse(model(x[idx]), y[idx])

    fit(
        model,
        loss_fn,
        steps=6,
        lr=0.05,
        seed=0,
        phase="mlp",
        ckpt_dir=out / "ckpt",
        ckpt_every=2,
        gradient_accumulation_steps=2,
    )
    if dist.is_main():
        save_file(model.state_dict(), out / "w.safetensors")


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), *([int(sys.argv[2]), sys.argv[3]] if len(sys.argv) > 2 else []))
    except DiffmemError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
