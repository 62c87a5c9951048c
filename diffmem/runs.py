"""Run directories: atomic writes, provenance, completion markers and resume checks.

Every file a stage publishes is written to a temporary name in the same folder and
renamed into place, so a killed job never leaves a half-written file under its final
name. A finished stage writes ``_SUCCESS``; a re-run of a finished stage is a no-op and
a re-run of an interrupted one continues where it stopped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffmem.errors import ConfigError, OutputError

if TYPE_CHECKING:
    import pandas as pd

SUCCESS = "_SUCCESS"
INFO = "info.json"
RUN_FILE = "run.json"  # the fingerprint a run dir was claimed with
INPUTS = "inputs.json"  # digests of the input tables a run started on
METRICS = "metrics.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = re.sub(r"[^\w]", "_", socket.gethostname().split(".")[0]) or "host"
#: a temporary file of :func:`atomic_path`: ``.<name>.<host>-<pid>.<random>.tmp`` (older
#: versions: ``.<name>.<random>.tmp``)
TMP_NAME = re.compile(r"^\..+?(?:\.(?P<host>\w+)-(?P<pid>\d+))?\.\w+\.tmp$")
STALE_TMP_S = 3600  # a temporary file untouched this long is a killed write's, whoever made it
_TRACKED_PACKAGES = (
    "diffmem",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "accelerate",
    "open_clip_torch",
    "peft",
    "faiss-cpu",
    "hydra-core",
    "numpy",
    "pandas",
)
#: OS errors of writing output (read-only, no permission, disk full, quota, file-size limit)
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A write the file system refuses (read-only, no permission, disk full, file-size limit) is
    an :class:`OutputError` naming ``path``; the temporary file is removed either way."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files get the usual mode
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in _OUTPUT_ERRNOS:
            raise OutputError(f"{path}: cannot write there ({os.strerror(err.errno)})") from err
        raise
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """``obj`` as JSON; non-finite floats (NaN, infinities) are written as null, so the file is
    always valid JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"
        )
    return Path(path)


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file; one that is not valid JSON (or not UTF-8) is a DataError naming it."""
    from diffmem.errors import DataError

    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def write_parquet(path: str | os.PathLike[str], df: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def read_parquet(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A Parquet table; an unreadable file is a DataError naming it."""
    import pandas as pd

    return _parquet(path, pd.read_parquet)


def parquet_rows(path: str | os.PathLike[str]) -> int:
    """The row count of a Parquet file from its footer (no rows read); errors as :func:`read_parquet`."""
    import pyarrow.parquet as pq

    return _parquet(path, lambda p: pq.read_metadata(p).num_rows)


def _parquet(path: str | os.PathLike[str], read: Callable[[str | os.PathLike[str]], Any]) -> Any:
    from diffmem.errors import DataError

    try:
        return read(path)
    except Exception as err:  # pyarrow raises many types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__})") from err


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NumPy's included) replaced by None, at any depth."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def git_hash() -> str | None:
    """The commit of the diffmem checkout, if it is one (with ``-dirty`` when modified)."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(cfg: Any = None) -> dict[str, Any]:
    """What every result records: resolved config, package versions, git hash and date."""
    from omegaconf import OmegaConf

    conf = OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None
    return {
        "config": conf,
        "versions": versions(),
        "git": git_hash(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _drop_nulls(v: Any) -> Any:
    """``v`` without the null entries of its mappings, at any depth (unset settings)."""
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_nulls(x) for x in v]
    return v


#: the longest folder name common file systems take (ext4, XFS, APFS, NTFS: 255 bytes)
MAX_NAME_BYTES = 255


def check_run_name(name: Any) -> None:
    """Refuse a run name (``name=``, the last folder of a run dir) that is not one safe path
    component: empty, ``.``/``..`` or with a separator would write outside ``outputs/<stage>/``;
    control characters, text that is not UTF-8 or more than :data:`MAX_NAME_BYTES` bytes cannot
    be a folder name."""
    text = "" if name is None else str(name)
    if text in ("", ".", "..") or any(c in text for c in "/\\\0"):
        raise ConfigError(f"name={text!r} must be one folder name (not empty, '.' or '..', no '/')")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # undecodable bytes on the command line (surrogate escapes)
        raise ConfigError(f"name={ascii(text)} is not UTF-8 text; use a UTF-8 folder name") from None
    if any(not c.isprintable() for c in text):
        raise ConfigError(f"name={ascii(text)} holds a control character; use a printable folder name")
    if size > MAX_NAME_BYTES:
        raise ConfigError(
            f"name={text[:40]!r}... is {size} bytes long; a folder name takes at most {MAX_NAME_BYTES} bytes"
        )


def check_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Refuse a run dir that cannot be made or written (a file of that name or of a folder
    above it, a read-only or not-writable folder) before any work starts; creates nothing."""
    path = Path(run_dir)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise OutputError(f"run_dir={path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"run_dir={path}: cannot write in {existing} (read-only or no permission)")


def _cause_first(key: str) -> tuple[bool, int, str]:
    """Sort key of a fingerprint difference: a group's identity (``features.extractor.name``,
    ``data.kind``) first, as its change explains the others (``features=sscd`` also changes the
    ``dcr_threshold`` it interpolates), then shallow keys before deep ones."""
    return key.rpartition(".")[2] not in ("name", "kind"), key.count("."), key


def check_claim(run_dir: str | os.PathLike[str], fingerprint: dict[str, Any]) -> bool:
    """Refuse ``run_dir`` if it holds a run with another config; create nothing.

    Returns whether ``run_dir`` already holds a run with this fingerprint. Null settings are
    left out of the comparison, so a config key added later with a null default keeps older
    run dirs resumable. Stages call it before validating their inputs, and :func:`claim` only
    once the inputs are known to be usable, so a refused run leaves no folder behind.
    """
    run_dir = Path(run_dir)
    marker = run_dir / RUN_FILE
    if not marker.exists():
        return False
    fingerprint = _drop_nulls(json.loads(json.dumps(fingerprint, default=_json_default)))
    old = _drop_nulls(read_json(marker))
    if old != fingerprint:
        a, b = _flatten(old), _flatten(fingerprint)
        diff = sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k)), key=_cause_first)
        key = diff[0] if diff else "?"
        more = f"; also {', '.join(diff[1:4])}{', ...' if len(diff) > 4 else ''}" if len(diff) > 1 else ""
        raise ConfigError(
            f"{run_dir} holds a run with another config ({key}: {a.get(key)!r} there, "
            f"{b.get(key)!r} now{more}); choose another name=... or delete the folder"
        )
    return True


def claim(run_dir: str | os.PathLike[str], fingerprint: dict[str, Any]) -> Path:
    """Create ``run_dir`` for a run with this (result-affecting) config, or resume it.

    The first call records ``fingerprint`` in ``run.json``; later calls with the same
    fingerprint resume; a different one is refused naming the first differing field,
    so results of two configs never mix in one folder. Claims of one folder take turns
    (a lock file beside it), so of two racing configs exactly one wins; a resumed run's
    stale temporary files (of killed writes) are removed.
    """
    import fcntl

    run_dir = Path(run_dir)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir.parent / f".{run_dir.name}.lock", "a")  # noqa: SIM115 (closed by the with block below)
    except OSError as err:
        raise ConfigError(f"{run_dir}: cannot create the run dir there ({err.strerror})") from err
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if check_claim(run_dir, fingerprint):
            remove_stale_temps(run_dir)
            return run_dir
        try:
            run_dir.mkdir(exist_ok=True)
        except OSError as err:  # e.g. a file of that name
            raise ConfigError(f"{run_dir}: cannot create the run dir there ({err.strerror})") from err
        write_json(run_dir / RUN_FILE, json.loads(json.dumps(fingerprint, default=_json_default)))
    return run_dir


def remove_stale_temps(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` under ``run_dir`` left by killed
    writes: made on this host by a process that is gone, or untouched for ``STALE_TMP_S``
    (other hosts' jobs of a sharded run may still be writing theirs). Returns them."""
    removed = []
    for folder, _, files in os.walk(run_dir):
        for name in files:
            m = TMP_NAME.match(name)
            if m is None:
                continue
            path = Path(folder) / name
            try:
                gone = m["pid"] is not None and m["host"] == _HOST and not _alive(int(m["pid"]))
                if gone or time.time() - path.stat().st_mtime > STALE_TMP_S:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # its write finished (renamed) meanwhile
                continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def file_stamp(path: str | os.PathLike[str], chunk: int = 1 << 20) -> dict[str, Any]:
    """Size and SHA256 of the first and last ``chunk`` bytes of a (large) file: tells one file
    from another (a rewrite, another build) without reading it all."""
    import hashlib

    size = os.stat(path).st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(chunk))
        fh.seek(max(0, size - chunk))
        h.update(fh.read(chunk))
    return {"size": size, "sha256_ends": h.hexdigest()}


def table_digest(df: pd.DataFrame) -> str:
    """SHA256 of a table's content (values, column names and order)."""
    import hashlib

    import pandas as pd

    h = hashlib.sha256(",".join(map(str, df.columns)).encode())
    h.update(pd.util.hash_pandas_object(df.astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()


def check_inputs(run_dir: str | os.PathLike[str], name: str, df: pd.DataFrame) -> None:
    """Record the content of an input table on first use; refuse a resume if it changed.

    The config fingerprint names input files, not their content: a manifest or prompt list
    edited between a kill and a resume would otherwise pair old outputs with new rows.
    """
    path = Path(run_dir) / INPUTS
    seen = read_json(path) if path.exists() else {}
    digest = table_digest(df)
    if name in seen and seen[name]["sha256"] != digest:
        raise ConfigError(
            f"{run_dir}: the {name} changed since this run started "
            f"({seen[name]['rows']} rows then, {len(df)} now); choose another name=..."
        )
    if name not in seen:
        write_json(path, {**seen, name: {"sha256": digest, "rows": len(df)}})


def resumed(path: str | os.PathLike[str], read: Callable[[Path], Any], make: Callable[[], Any]) -> Any:
    """``read(path)`` of a piece of work an earlier attempt of this run stored at ``path``;
    ``make()`` stores it first when it is missing, and again when it is damaged (``read``
    fails on it: it is removed, with one warning line naming it), so that a resume never
    trusts a damaged piece nor sticks on it."""
    import logging

    path = Path(path)
    if path.exists():
        try:
            return read(path)
        except Exception as err:  # safetensors, JSON and table readers raise many types for a damaged file
            logging.getLogger(__name__).warning("%s is damaged (%s); recomputing it", path, type(err).__name__)
            path.unlink()
    make()
    return read(path)


def is_done(run_dir: str | os.PathLike[str]) -> bool:
    return (Path(run_dir) / SUCCESS).exists()


def mark_done(run_dir: str | os.PathLike[str], summary: dict[str, Any] | None = None) -> None:
    write_json(Path(run_dir) / SUCCESS, summary or {})


def reopen(run_dir: str | os.PathLike[str]) -> None:
    """Take back a finished run's ``_SUCCESS`` (a damaged output found on resume), so that its
    stage recomputes the damage and publishes again and no reader trusts it meanwhile."""
    (Path(run_dir) / SUCCESS).unlink(missing_ok=True)


def require(cfg: Any, *keys: str, prefix: str = "", hint: str = "") -> None:
    """Raise a ConfigError naming the first of ``keys`` that is unset (``???``, null or "")."""
    from omegaconf import DictConfig, OmegaConf

    for key in keys:
        missing = isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key)
        if missing or cfg.get(key) in (None, ""):
            raise ConfigError(f"{prefix}{key} is required" + (f": {hint}" if hint else ""))


def digest(value: Any) -> str:
    """A short stable hash of a plain or OmegaConf value (names cache entries and trial dirs).

    Null entries of mappings are left out at any depth, so a setting added later as null keeps
    the digests, and so the finished work, of earlier runs (as :func:`check_claim` does)."""
    import hashlib

    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return hashlib.sha1(json.dumps(_drop_nulls(value), sort_keys=True, default=str).encode()).hexdigest()[:12]
