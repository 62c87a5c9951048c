"""Config composition and the Hydra entry points of the stages.

Library code takes plain (already composed) configs; only this module touches Hydra's
global state, so notebooks and the CLI run the very same stage functions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from diffmem.errors import DiffmemError
from diffmem.registry import Registry
from diffmem.runs import check_run_name

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"
ASSETS_DIR = PACKAGE_DIR / "assets"

#: stage name -> module with ``run(cfg)`` and ``main()``
STAGES = Registry("stage")
for _name, _module in [("train", "diffmem.train"), ("generate", "diffmem.generate"),
                       ("embed", "diffmem.embed"), ("index", "diffmem.index.stage"),
                       ("search", "diffmem.search"), ("detect", "diffmem.detect"),
                       ("audit", "diffmem.audit"), ("probe", "diffmem.probe"),
                       ("generalise", "diffmem.generalise"), ("mitigate", "diffmem.mitigate"),
                       ("evaluate-mitigation", "diffmem.evaluate_mitigation")]:
    STAGES.register(_name, _module)

if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS_DIR / name))


def _lazy(module: str, attr: str):
    def resolve(*args):
        import importlib

        return getattr(importlib.import_module(module), attr)(*args)
    return resolve


for _resolver, _module, _attr in (("digest", "diffmem.runs", "digest"),
                                  ("optuna_storage", "diffmem.mitigations.memcontrol", "storage_url"),
                                  ("optuna_remaining", "diffmem.mitigations.memcontrol", "remaining_trials")):
    if not OmegaConf.has_resolver(_resolver):  # used by experiment=memcontrol (a resumable study)
        OmegaConf.register_new_resolver(_resolver, _lazy(_module, _attr))


def stage_module(stage: str):
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


def compose(stage: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config of ``stage`` with Hydra-style ``overrides``, as the CLI would build it."""
    from hydra import compose as _compose, initialize_config_dir

    stage_module(stage)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = _compose(config_name=config_name(stage), overrides=[*local_overrides(), *overrides],
                       return_hydra_config=return_hydra_config)
    return cfg


def run(stage: str, overrides: Sequence[str] = ()) -> Path:
    """Run ``stage`` in-process (as ``diffmem <stage> overrides`` would); returns its run dir."""
    cfg = compose(stage, overrides)
    check_run_name(cfg.get("name", "-"))
    stage_module(stage).run(cfg)
    return Path(cfg.run_dir)


def _exit(stage: str, err: DiffmemError):
    """A user error as the CLI reports it: one line on stderr, exit status 2."""
    print(f"diffmem {stage}: error: {err}", file=sys.stderr)
    sys.exit(2)


def hydra_app(stage: str, fn: Callable[[DictConfig], object]) -> Callable[[], object]:
    """A Hydra ``main`` for ``stage``: sets ``run_dir`` from Hydra, turns user errors into one line."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name(stage))
    def _app(cfg: DictConfig):
        try:
            check_run_name(cfg.get("name", "-"))
            with open_dict(cfg):
                cfg.run_dir = HydraConfig.get().runtime.output_dir
            return fn(cfg)
        except DiffmemError as err:
            _exit(stage, err)

    def main():
        try:  # before Hydra creates the run dir named after it
            for arg in sys.argv[1:]:
                key, eq, value = arg.lstrip("+").partition("=")
                if eq and key == "name":
                    check_run_name(value.strip("'\""))
        except DiffmemError as err:
            _exit(stage, err)
        sys.argv[1:1] = local_overrides()
        return _app()

    return main
