"""One lifecycle for every stage: validate -> fingerprint -> claim or resume -> body -> publish.

A stage declares a :class:`StageSpec` (its checks, its inputs, its body, and which settings do
not change its results); :meth:`StageSpec.run` does the rest, the same way for every stage:

1. ``prepare(cfg)`` checks the config and reads the (cheap) inputs, before anything is written;
2. the **fingerprint** is derived: every resolved setting except those the spec (or
   :data:`VOLATILE`) marks as not changing results, plus ``extra`` content digests (upstream
   runs). A run dir claimed with another fingerprint is refused naming the first differing key;
3. the inputs' digests (``inputs``) are compared with those the run started on (refused when
   they changed); a **finished** run is trusted only while every file it published is intact
   (``_SUCCESS`` lists them with their digests) and its guards hold; otherwise it is reopened,
   with the reason in one log line, and its damaged outputs removed so the body recomputes them;
4. the run dir is claimed and ``body(job)`` runs; a body that fails before producing any file
   gives its claim back, so the corrected command is not refused;
5. the runner publishes ``metrics.json`` (with provenance), ``info.json`` and ``_SUCCESS``, last.

In a data-parallel job (:mod:`diffmem.distributed`: ``accelerate launch``, ``torchrun``,
submitit tasks) rank 0 alone does 2-5; the other ranks wait for its claim, then run the body
on their share of the rows (a stage's body splits them and syncs where it must). A stage that
does not declare ``data_parallel`` refuses to start with several ranks.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffmem import distributed
from diffmem.errors import DataError, DiffmemError
from diffmem.runs import (
    INFO,
    INPUTS,
    METRICS,
    RUN_FILE,
    SUCCESS,
    check_claim,
    check_inputs,
    claim,
    file_stamp,
    mark_done,
    provenance,
    read_json,
    write_json,
)

log = logging.getLogger(__name__)

#: settings of every stage that never change results: where a run goes and its name (top level)
TOP_VOLATILE = ("name", "run_dir", "stage", "paths")
#: ... and, at any depth (a sub-stage's copy too: the audit's ``embed.data.on_error``), how fast
#: it runs and ``data``'s guards, which only refuse inputs (a run stopped by a corrupt image
#: resumes with ``data.on_error=skip``, one refused for a large image with a raised ``max_pixels``)
VOLATILE = ("threads", "device", "num_workers", "shard", "data.on_error", "data.max_pixels", "data.allow_outside_root")
#: files of the runner itself, never outputs
_OWN = {RUN_FILE, INPUTS, SUCCESS}
#: outputs up to this size are hashed whole (metrics, small tables); larger ones (PNGs, parts, indexes) by
#: size and the hashes of their first and last this many bytes: a re-run of a finished 100k-image run
#: reads ~13 GB less than whole hashes would, and truncation, deletion and rewrites still show
_HASH_BYTES = 1 << 16


@dataclass
class Job:
    """What a body gets: the config, its claimed run dir and what ``prepare`` returned."""

    cfg: DictConfig
    dir: Path
    ctx: Any = None


@dataclass
class Outcome:
    """What a body returns: ``summary`` (into ``_SUCCESS``), ``info`` (into ``info.json``),
    ``metrics`` (``metrics.json``, provenance added; None: the stage writes none), and
    ``complete=False`` for a shard whose run is finished by another job (nothing is published)."""

    summary: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    complete: bool = True


def fingerprint(cfg: DictConfig, volatile: tuple[str, ...] = (), extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every resolved setting of ``cfg`` except the ``volatile`` ones (dotted paths from the top),
    :data:`TOP_VOLATILE` and :data:`VOLATILE` (at any depth), plus ``extra`` (content digests)."""
    plain = cast(
        "dict[str, Any]",
        OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else dict(cfg),
    )
    for key in (*TOP_VOLATILE, *volatile):
        _drop(plain, key.split("."))
    _drop_anywhere(plain, [key.split(".") for key in VOLATILE])
    return {**plain, **(extra or {})}


def _drop(node: Any, path: list[str]) -> None:
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _drop_anywhere(node: Any, paths: list[list[str]]) -> None:
    """Remove every one of ``paths`` from ``node`` and from each mapping nested in it."""
    if not isinstance(node, dict):
        return
    for path in paths:
        _drop(node, path)
    for value in node.values():
        _drop_anywhere(value, paths)


def output_digests(run_dir: Path, scratch: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, sha256}}`` of every file a run published (sub-runs with their own
    ``_SUCCESS``, ``scratch`` folders and the runner's own files left out); large files by size
    and ends."""
    out: dict[str, dict[str, Any]] = {}
    subruns = {p.parent for p in run_dir.rglob(SUCCESS) if p.parent != run_dir} | {run_dir / s for s in scratch}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if not path.is_file() or path.name in _OWN or _unpublished(rel) or any(s in path.parents for s in subruns):
            continue
        size = path.stat().st_size
        stamp = (
            {"size": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            if size <= _HASH_BYTES
            else file_stamp(path, _HASH_BYTES)
        )
        out[str(rel)] = stamp
    return out


def damaged_outputs(run_dir: Path) -> dict[str, str]:
    """The files ``_SUCCESS`` lists that are now missing or changed, each with what happened to it
    (a ``_SUCCESS`` of an older version lists none, so nothing is checked)."""
    try:
        listed = read_json(run_dir / SUCCESS).get("outputs", {})
    except (DataError, AttributeError):  # a damaged marker: nothing it says is trusted
        return {SUCCESS: "unreadable"}
    bad = {}
    for rel, stamp in listed.items():
        path = run_dir / rel
        try:
            size = path.stat().st_size
            now = (
                {"size": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                if "sha256" in stamp
                else file_stamp(path, _HASH_BYTES)
            )
        except OSError:
            bad[rel] = "missing"
            continue
        if now != stamp:
            bad[rel] = (
                f"cut short ({size} of {stamp['size']} bytes)"
                if size < stamp["size"]
                else "changed since it was published"
            )
    return bad


@dataclass(frozen=True)
class StageSpec:
    """A stage: its checks and inputs (``prepare``), its work (``body``), the settings that do not
    change its results (``volatile``), content digests of what it reads (``extra``), the tables whose
    content must not change under a run (``inputs``), and ``guard``: why a finished run is not done
    under this config (e.g. it skipped images and ``on_error`` is now ``fail``), or None.
    ``scratch``: folders of resume state (checkpoints), not outputs; ``after(job)`` runs once the
    run is published (e.g. removes them)."""

    name: str
    body: Callable[[Job], Outcome]
    prepare: Callable[[DictConfig], Any] = lambda cfg: None
    volatile: tuple[str, ...] = ()
    extra: Callable[[DictConfig, Any], dict[str, Any]] | None = None
    inputs: Callable[[DictConfig, Any], dict[str, Any]] | None = None
    guard: Callable[[DictConfig, dict[str, Any]], str | None] | None = None
    run_dir: Callable[[DictConfig], str | os.PathLike[str]] = lambda cfg: cfg.run_dir
    scratch: tuple[str, ...] = ()
    after: Callable[[Job], None] | None = None
    data_parallel: bool = False

    def fingerprint(self, cfg: DictConfig, ctx: Any = None) -> dict[str, Any]:
        return fingerprint(cfg, self.volatile, self.extra(cfg, ctx) if self.extra else None)

    def run(self, cfg: DictConfig) -> Path:
        """Run the stage per ``cfg`` (resuming or reusing its run dir); returns the run dir."""
        if not self.data_parallel:
            distributed.single_process(self.name)
        ctx = self.prepare(cfg)
        run_dir = Path(self.run_dir(cfg))
        if not distributed.is_main():
            go = distributed.share()  # rank 0: True once claimed, False when already done, or why it stopped
            if isinstance(go, str):
                raise distributed.RankError(go)
            if go:
                self.body(Job(cfg, run_dir, ctx))
            return run_dir
        try:
            fp = self.fingerprint(cfg, ctx)
            tables = self.inputs(cfg, ctx) if self.inputs else {}
            if check_claim(run_dir, fp):
                for name, table in tables.items():
                    check_inputs(run_dir, name, table)
                if (run_dir / SUCCESS).exists() and self._still_done(run_dir, cfg):
                    log.info("%s: %s is complete", self.name, run_dir)
                    distributed.share(False)
                    return run_dir
            before = _files(run_dir) if run_dir.is_dir() else None
            new_claim = not (run_dir / RUN_FILE).exists()
            run_dir = claim(run_dir, fp)
            for name, table in tables.items():  # recorded on a new claim
                check_inputs(run_dir, name, table)
        except DiffmemError as err:
            distributed.share(f"{self.name}: rank 0 stopped: {err}")
            raise
        distributed.share(True)
        try:
            outcome = self.body(Job(cfg, run_dir, ctx))
        except BaseException:
            if new_claim:
                _release_if_unused(run_dir, before or set())
            raise
        if outcome.complete:
            self.publish(run_dir, cfg, outcome)
            if self.after:
                self.after(Job(cfg, run_dir, ctx))
        return run_dir

    def _still_done(self, run_dir: Path, cfg: DictConfig) -> bool:
        """Whether a finished run may be reused: its outputs and sub-runs intact, its guard
        holding. If not, ``_SUCCESS`` is taken back and the damaged files removed, one warning
        line each (a damaged sub-run says so itself when the body runs it again)."""
        damaged = damaged_outputs(run_dir)
        for rel, what in damaged.items():
            log.warning("%s: %s of a finished run is %s; recomputing it", self.name, run_dir / rel, what)
            (run_dir / rel).unlink(missing_ok=True)
        if damaged:
            return False
        subrun = next(
            (p.parent for p in run_dir.rglob(SUCCESS) if p.parent != run_dir and damaged_outputs(p.parent)), None
        )
        if subrun is not None:
            log.info("%s: %s is finished but its step %s is damaged", self.name, run_dir, subrun.relative_to(run_dir))
        else:
            reason = self.guard(cfg, read_json(run_dir / SUCCESS).get("summary", {})) if self.guard else None
            if reason is None:
                return True
            log.warning("%s: %s was finished but %s; recomputing", self.name, run_dir, reason)
        (run_dir / SUCCESS).unlink()
        return False

    def publish(self, run_dir: Path, cfg: DictConfig, outcome: Outcome) -> None:
        """``metrics.json`` (when the body has metrics), ``info.json`` and ``_SUCCESS`` (the summary
        and the digests of every published file), in that order."""
        prov = provenance(cfg)
        if outcome.metrics is not None:
            write_json(run_dir / METRICS, {**outcome.metrics, "provenance": prov})
        write_json(run_dir / INFO, {"stage": self.name, **outcome.info, **prov})
        mark_done(run_dir, {"summary": outcome.summary, "outputs": output_digests(run_dir, self.scratch)})


def _lock(path: Path) -> bool:
    """A claim's lock file (``.<run dir name>.lock``, beside the run dir of a sub-run)."""
    return path.name.startswith(".") and path.name.endswith(".lock")


def _unpublished(rel: Path) -> bool:
    """Files in a run dir that are no outputs: hidden ones (Hydra's ``.hydra/``, temporary files,
    claim locks) and logs, which grow after publishing."""
    return any(part.startswith(".") for part in rel.parts) or rel.suffix == ".log"


def _files(run_dir: Path) -> set[Path]:
    return {p for p in run_dir.rglob("*") if p.is_file() and not _unpublished(p.relative_to(run_dir))}


def _release_if_unused(run_dir: Path, before: set[Path]) -> None:
    """Give back a new claim whose body failed before producing any file: its ``run.json`` and
    ``inputs.json`` go, and the folder when nothing else is in it, so the corrected command is
    not refused as another config."""
    if any(p.name not in _OWN for p in _files(run_dir) - before):
        return
    for name in (RUN_FILE, INPUTS):
        (run_dir / name).unlink(missing_ok=True)
    for lock in filter(_lock, run_dir.rglob("*")):
        lock.unlink(missing_ok=True)
    try:
        for folder in sorted((p for p in run_dir.rglob("*") if p.is_dir()), reverse=True):
            folder.rmdir()
        run_dir.rmdir()
    except OSError:  # a folder with something in it (an input put there, another job's temporary file)
        pass


def require_items(n: int, what: str, where: Any) -> None:
    """A run that would publish no items is an error, not a success."""
    if n == 0:
        raise DataError(f"{where}: no {what} to publish (every input was skipped or empty)")


def on_error_guard(cfg_on_error: str, n_skipped: int) -> str | None:
    """A run finished with skipped items is not done under ``on_error=fail``."""
    if n_skipped and cfg_on_error == "fail":
        return f"it skipped {n_skipped} unreadable image(s) and on_error is now 'fail'"
    return None
