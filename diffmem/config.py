"""Config composition and the Hydra entry points of the stages.

Library code takes plain (already composed) configs; only this module touches Hydra's
global state, so notebooks and the CLI run the very same stage functions.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf, open_dict

from diffmem.checks import did_you_mean
from diffmem.distributed import relaunch_cpu_ranks
from diffmem.errors import ConfigError, DiffmemError
from diffmem.registry import Registry
from diffmem.runs import check_run_name

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"
ASSETS_DIR = PACKAGE_DIR / "assets"

#: stage name -> module with ``run(cfg)`` and ``main()``
STAGES = Registry("stage")
for _name, _module in [
    ("train", "diffmem.train"),
    ("generate", "diffmem.generate"),
    ("embed", "diffmem.embed"),
    ("index", "diffmem.index.stage"),
    ("search", "diffmem.search"),
    ("dedup", "diffmem.dedup"),
    ("detect", "diffmem.detect"),
    ("audit", "diffmem.audit"),
    ("probe", "diffmem.probe"),
    ("generalise", "diffmem.generalise"),
    ("mitigate", "diffmem.mitigate"),
    ("evaluate-mitigation", "diffmem.evaluate_mitigation"),
]:
    STAGES.register(_name, _module)

if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS_DIR / name))


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    def resolve(*args: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), attr)(*args)

    return resolve


for _resolver, _module, _attr in (
    ("digest", "diffmem.runs", "digest"),
    ("optuna_storage", "diffmem.mitigations.memcontrol", "storage_url"),
    ("optuna_remaining", "diffmem.mitigations.memcontrol", "remaining_trials"),
):
    if not OmegaConf.has_resolver(_resolver):  # used by experiment=memcontrol (a resumable study)
        OmegaConf.register_new_resolver(_resolver, _lazy(_module, _attr))


def stage_module(stage: str) -> ModuleType:
    """The module of ``stage`` (a "did you mean" error for unknown names)."""
    return STAGES.get(stage)


def config_name(stage: str) -> str:
    """The root config of ``stage`` (``evaluate-mitigation`` -> ``evaluate_mitigation.yaml``)."""
    return stage.replace("-", "_")


def local_overrides() -> list[str]:
    """Machine-specific configs (SLURM partition/account, paths) live in a git-ignored folder,
    ``local/`` in the working directory or ``$DIFFMEM_LOCAL_CONF``: when it exists it joins
    Hydra's search path, so ``local/hydra/launcher/mycluster.yaml`` is selected with
    ``hydra/launcher=mycluster`` and ``local/paths/cluster.yaml`` with ``paths=cluster``."""
    local = Path(os.environ.get("DIFFMEM_LOCAL_CONF", "local"))
    return [f"hydra.searchpath=[file://{local.resolve()}]"] if local.is_dir() else []


def compose(
    stage: str, overrides: Sequence[str] = (), return_hydra_config: bool = False, hints: bool = True
) -> DictConfig:
    """The config of ``stage`` with Hydra-style ``overrides``, as the CLI would build it; an
    override Hydra cannot apply (unknown key or option, malformed) is a one-line ConfigError
    (with a "did you mean" hint unless ``hints`` is false)."""
    with _initialized():
        return _compose(stage, overrides, return_hydra_config, hints)


@contextlib.contextmanager
def _initialized() -> Iterator[None]:
    """Hydra initialised on the package's configs (its job named ``config`` as under
    ``hydra.main`` in this module: the job log is ``config.log``)."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="config"):
        yield


def _compose(stage: str, overrides: Sequence[str], return_hydra_config: bool, hints: bool = True) -> DictConfig:
    """:func:`compose` once Hydra is initialised."""
    from hydra import compose as _hydra_compose
    from hydra.errors import HydraException

    stage_module(stage)
    try:
        return _hydra_compose(
            config_name=config_name(stage),
            overrides=[*local_overrides(), *overrides],
            return_hydra_config=return_hydra_config,
        )
    except HydraException as err:
        raise _composition_error(stage, overrides, err, hints) from None


def _composition_error(stage: str, overrides: Sequence[str], err: Exception, hints: bool = True) -> ConfigError:
    """Hydra's multi-line composition error as one line, with a "did you mean" over the keys
    (or group options) that exist."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    if isinstance(err, MissingConfigException) and err.options:
        group, _, option = str(err.missing_cfg_file).rpartition("/")
        return ConfigError(
            f"{group}={option}: no such option (options: {', '.join(err.options)})." + did_you_mean(option, err.options)
        )
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        full = str(cause.full_key)
        parent, _, key = full.rpartition(".")
        hint = did_you_mean(key, _keys(stage, parent, overrides, full), paren=True) if hints else ""
        name = next((k for k in map(_override_key, overrides) if k.startswith(full + ".")), full)
        where = f" ('{full}' does not exist)" if name != full else ""
        return ConfigError(f"{name}: no such key in the {stage} config{where}{hint}; add a new key with +{name}=...")
    if isinstance(err, OverrideParseException):
        lines = [ln for ln in err.message.splitlines() if ln.strip() and not ln.startswith("See https")]
        return ConfigError(f"cannot parse the override {err.override!r}: {_parse_problem(lines)}")
    return ConfigError("; ".join(ln.strip() for ln in str(err).splitlines() if ln.strip()))


def _parse_problem(lines: list[str]) -> str:
    """Hydra's parse error as words: the lexer's "line + caret" becomes the character it stopped at."""
    if len(lines) >= 2 and lines[-1].strip() == "^" and lines[0].startswith("LexerNoViableAltException"):
        at = lines[-1].index("^")
        char = lines[0][at] if at < len(lines[0]) else "?"
        key, _, value = lines[0].partition(": ")[2].partition("=")
        return (
            f"the character {char!r} is not allowed unquoted (non-ASCII or special characters "
            f"need quotes: {key}='{value}')"
        )
    return lines[-1]


def _override_key(override: str) -> str:
    """The dotted key an override sets (``+a.b=1`` -> ``a.b``)."""
    return override.lstrip("+~").partition("=")[0]


def _keys(stage: str, parent: str, overrides: Sequence[str], unknown: str) -> list[str]:
    """The keys under ``parent`` in ``stage``'s config with the ``overrides`` other than the one
    setting the ``unknown`` key or one below it (so ``data=folder`` counts), for "did you mean"
    hints. Composed without hints: a second bad override never recurses."""
    rest = [o for o in overrides if _override_key(o) != unknown and not _override_key(o).startswith(unknown + ".")]
    try:  # Hydra is initialised: this runs from _compose
        cfg = _compose(stage, rest, return_hydra_config=False, hints=False)
    except ConfigError:  # another bad override: the stage's defaults
        cfg = _compose(stage, (), return_hydra_config=False, hints=False)
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def run(stage: str, overrides: Sequence[str] = ()) -> Path:
    """Run ``stage`` in-process (as ``diffmem <stage> overrides`` would); returns its run dir."""
    from diffmem.schema import settle_precision, validate

    cfg = compose(stage, overrides)
    validate(stage, cfg)
    settle_precision(cfg)
    stage_module(stage).run(cfg)
    return Path(cfg.run_dir)


def _exit(stage: str, err: DiffmemError) -> NoReturn:
    """A user error as the CLI reports it: one line on stderr, exit status 2."""
    print(f"diffmem {stage}: error: {err}", file=sys.stderr)
    sys.exit(2)


def _discard_unclaimed(run_dir: Path, log_name: str) -> None:
    """Remove what Hydra wrote for a command refused before the runner claimed its run dir
    (``.hydra/`` and the job log, when the dir holds nothing else), and the dir once empty
    (not the working directory): a refused command leaves nothing behind."""
    import shutil

    if run_dir.is_dir() and all(p.name in (".hydra", log_name) for p in run_dir.iterdir()):
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        (run_dir / log_name).unlink(missing_ok=True)
        if run_dir.resolve() != Path.cwd().resolve():
            with contextlib.suppress(OSError):  # another process wrote there meanwhile: keep it
                run_dir.rmdir()


def hydra_app(stage: str, fn: Callable[[DictConfig], object]) -> Callable[[], object]:
    """A Hydra ``main`` for ``stage``: sets ``run_dir`` from Hydra, checks the config against the
    stage's schema, turns user errors into one line.

    A single run (no ``-m``, ``--cfg`` or other flag, and no ``hydra.mode: MULTIRUN`` in the
    config) is composed once, checked before Hydra makes its run dir, and run as Hydra runs a
    job (:func:`_run_job`); ``hydra.main`` itself would compose twice more (once to pick the
    mode), ~0.1 CPU-s each. Everything else goes through ``hydra.main``."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from diffmem.schema import settle_precision, validate

    def task(cfg: DictConfig) -> object:
        try:
            with open_dict(cfg):
                cfg.run_dir = HydraConfig.get().runtime.output_dir
            validate(stage, cfg)
            settle_precision(cfg)
            return fn(cfg)
        except DiffmemError as err:
            _discard_unclaimed(Path(cfg.run_dir), f"{HydraConfig.get().job.name}.log")
            _exit(stage, err)

    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name(stage))(task)

    def main() -> object:
        relaunch_cpu_ranks()  # before Hydra creates the run dir: the ranks do
        args = sys.argv[1:]
        try:  # before Hydra creates the run dir named after it
            for arg in args:
                key, eq, value = arg.lstrip("+").partition("=")
                if eq and key == "name":
                    check_run_name(value.strip("'\""))
            if not any(arg.startswith("-") for arg in args):
                with _initialized():
                    cfg = _compose(stage, args, return_hydra_config=True)
                    validate(stage, cfg)
                    if cfg.hydra.mode != RunMode.MULTIRUN:
                        return _run_job(stage, cfg, task)
        except DiffmemError as err:
            _exit(stage, err)
        sys.argv[1:1] = local_overrides()
        return app()

    return main


def _run_job(stage: str, cfg: DictConfig, task: Callable[[DictConfig], object]) -> object:
    """``task`` run on ``cfg`` (composed with its ``hydra`` node, Hydra initialised) as
    ``hydra.main`` runs a single job: the run dir, ``.hydra/``, the job log, Hydra's callbacks;
    the task's exception propagates."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode

    cfg.hydra.mode = RunMode.RUN  # as hydra.main records it
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name=config_name(stage))
    ret = run_job(
        task_function=task,
        config=cfg,
        job_dir_key="hydra.run.dir",
        job_subdir_key=None,
        hydra_context=HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=callbacks),
    )
    callbacks.on_run_end(config=cfg, config_name=config_name(stage), job_return=ret)
    return ret.return_value
