"""Kill a stage with SIGKILL at a chosen point, and compare run dirs with a reference.

Stages run in forked children of the test process (``stage.main()``: the CLI's Hydra
entry point, with ``sys.argv`` set), so a run costs no interpreter start-up and no
re-import. The parent polls the run dir and sends SIGKILL once a glob pattern matches
``count`` files (optionally after a short extra delay), or after a plain delay.

Writes of small files take microseconds, so a kill from outside rarely lands inside one;
a ``write=n`` point does it on purpose: the child's file writers (PIL, pandas, numpy,
torch, safetensors, FAISS, ``Path.write_*``) are wrapped, and the n-th write is cut to
half its length before the child SIGKILLs itself, i.e. exactly what a kill in the middle
of that write leaves on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: kills sent to a live stage process, and kills whose resumed run was checked
KILLS = {"performed": 0, "checked": 0}
TIMEOUT_S = 300


@dataclass(frozen=True)
class KillPoint:
    """SIGKILL once ``pattern`` (a glob under the run dir) matches ``count`` paths and then
    ``delay`` seconds passed; ``pattern=None`` kills ``delay`` seconds after the start,
    unless ``write`` is set: then the child kills itself halfway through that file write."""

    pattern: str | None
    count: int = 1
    delay: float = 0.0
    write: int | None = None  # SIGKILL in the middle of the child's write-th file write

    def __str__(self) -> str:
        if self.write is not None:
            return f"the middle of file write #{self.write}"
        where = f"{self.count} x {self.pattern}" if self.pattern else "start"
        return f"{where} + {self.delay * 1000:.0f} ms"


def _writers() -> list[tuple[object, str, int, str]]:
    """(owner, attribute, position and name of the target argument) of the file writers
    stages use."""
    import faiss
    import numpy
    import pandas
    import safetensors.torch
    import torch
    from PIL import Image

    return [
        (Image.Image, "save", 1, "fp"),
        (pandas.DataFrame, "to_parquet", 1, "path"),
        (numpy, "save", 0, "file"),
        (Path, "write_text", 0, "self"),
        (Path, "write_bytes", 0, "self"),
        (safetensors.torch, "save_file", 1, "filename"),
        (torch, "save", 1, "f"),
        (faiss, "write_index", 1, "fname"),
    ]


@contextlib.contextmanager
def watch_writes(after_write):
    """Call ``after_write(target)`` (a path or an open file) after every file write."""
    saved = []
    for owner, name, pos, key in _writers():
        real = getattr(owner, name)

        def hooked(*args, _real=real, _pos=pos, _key=key, **kwargs):
            out = _real(*args, **kwargs)
            after_write(args[_pos] if len(args) > _pos else kwargs[_key])
            return out

        saved.append((owner, name, real))
        setattr(owner, name, hooked)
    try:
        yield
    finally:
        for owner, name, real in saved:
            setattr(owner, name, real)


def _cut_and_die(target) -> None:
    """Leave ``target`` half-written, as a kill during its write would, and SIGKILL self."""
    if hasattr(target, "fileno"):
        target.flush()
        os.ftruncate(target.fileno(), os.fstat(target.fileno()).st_size // 2)
    else:
        os.truncate(target, os.path.getsize(target) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def count_writes():
    """``with count_writes() as n:`` ... ``n[0]`` is the number of file writes made inside."""
    n = [0]

    def count(target):
        n[0] += 1

    with watch_writes(count):
        yield n


def _child(stage: str, overrides: list[str], log: Path, write: int | None) -> None:
    """Runs in the forked child: the stage's CLI entry point; never returns."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        import threading

        import torch
        from tqdm import auto, std

        # tqdm's default lock includes a semaphore shared with the parent: a child killed
        # while holding it would block the parent's (and every later child's) progress bars
        for cls in (std.tqdm, auto.tqdm):
            cls.set_lock(threading.RLock())

        if write is not None:
            seen = [0]

            def after_write(target):
                seen[0] += 1
                if seen[0] == write:
                    _cut_and_die(target)

            hooks = watch_writes(after_write)  # kept referenced: collecting it would undo the hooks
            hooks.__enter__()  # never exited: the child ends with os._exit

        from diffmem.config import stage_module

        torch.set_num_threads(1)
        sys.argv = [f"diffmem-{stage}", *overrides]
        stage_module(stage).main()
        code = 0
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 - report anything, then leave without pytest's cleanup
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_stage(stage: str, overrides: list[str], run_dir: Path, log: Path, kill: KillPoint | None = None) -> bool:
    """Run ``diffmem <stage> overrides``; with ``kill``, SIGKILL it at that point.

    Returns whether the process was killed (False: it finished first, successfully).
    A failed run raises with the end of its log.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        _child(stage, overrides, log, kill.write if kill is not None else None)
    start, fired = time.monotonic(), None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if now - start > TIMEOUT_S:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"{stage} {overrides}: no exit within {TIMEOUT_S} s\n{_tail(log)}")
        if (
            kill is not None
            and kill.write is None
            and fired is None
            and (kill.pattern is None or len(list(run_dir.glob(kill.pattern))) >= kill.count)
        ):
            fired = now
        if fired is not None and now - fired >= kill.delay:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.001)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        KILLS["performed"] += 1
        return True
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise AssertionError(f"{stage} {overrides}: exit code {code}\n{_tail(log)}")
    return False


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _hidden(rel: Path) -> bool:
    """Temporary and bookkeeping names (``.x.tmp``, ``.hydra/``): not published outputs."""
    return any(part.startswith(".") for part in rel.parts)


def _read(path: Path):
    """Parse ``path`` by its type; raises if it is truncated or corrupt."""
    suffix = path.suffix
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path)
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    if suffix == ".json" or path.name == "_SUCCESS":
        return json.loads(path.read_text())
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    if suffix == ".pt":
        import torch

        return torch.load(path, weights_only=True)
    if suffix == ".faiss":
        import faiss

        return faiss.serialize_index(faiss.read_index(str(path)))
    if suffix in (".txt", ".log"):
        return path.read_text()
    raise AssertionError(f"{path}: no reader for this kind of output (add one to faultlib._read)")


def assert_all_readable(run_dir: Path, context: str) -> None:
    """Every published (non-hidden) file under ``run_dir`` opens and parses."""
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not _hidden(path.relative_to(run_dir)):
            try:
                _read(path)
            except Exception as err:
                raise AssertionError(
                    f"{context}: half-written file visible under its final name: "
                    f"{path.relative_to(run_dir)} ({type(err).__name__}: {err})"
                ) from err


_PROVENANCE = ("date", "git", "versions", "provenance", "seconds")  # differ between two runs of one config


def snapshot(run_dir: Path, skip: tuple[str, ...] = ()) -> dict[str, object]:
    """The published outputs of ``run_dir``: file bytes by relative path (JSON parsed, minus
    provenance that differs between runs). ``skip``: top-level folders left out."""
    out: dict[str, object] = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if not path.is_file() or _hidden(rel) or rel.parts[0] in skip or path.suffix == ".log":
            continue
        if path.suffix == ".json" or path.name == "_SUCCESS":
            obj = json.loads(path.read_text())
            out[str(rel)] = {k: v for k, v in obj.items() if k not in _PROVENANCE} if isinstance(obj, dict) else obj
            if path.name == "_SUCCESS" and "outputs" in obj:  # digests of files with provenance: the list
                out[str(rel)]["outputs"] = sorted(obj["outputs"])
        else:
            out[str(rel)] = path.read_bytes()
    return out


def assert_same_outputs(got: dict, want: dict, context: str) -> None:
    """``got`` equals the reference ``want`` file by file (names the first difference)."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{context}: missing {missing[:5]}, unexpected {extra[:5]}"
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"{context}: {len(differ)} outputs differ from the uninterrupted run, e.g. {differ[:5]}"
