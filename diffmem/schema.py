"""Each stage's config schema: typed fields with ranges, checked in one place before any work.

:func:`validate` runs on the composed config of a stage before the stage function (the CLI
and :func:`diffmem.run` both call it), so a nonsense value (``steps=2.7``,
``guidance_scale=nan``, ``seed=-1``, ``device=cuda`` on a CPU machine, an unwritable run dir)
is one line naming the field and never reaches :func:`diffmem.runs.claim`. Fields a config
does not have are skipped (a group may leave them out); what depends on more than one field
or on files (shards, registries, data) stays with the stage or library that owns it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffmem.checks import check_choice, check_float, check_int
from diffmem.device import check_device, resolve_device
from diffmem.errors import ConfigError
from diffmem.runs import check_run_dir, check_run_name

Check = Callable[[object, str], object]
log = logging.getLogger(__name__)


def _int(minimum: int | None = None, optional: bool = False) -> Check:
    return partial(check_int, minimum=minimum, optional=optional)


def _float(
    minimum: float | None = None, maximum: float | None = None, above: float | None = None, optional: bool = False
) -> Check:
    return partial(check_float, minimum=minimum, maximum=maximum, above=above, optional=optional)


COUNT, COUNT_OR_NULL, FINITE = _int(1), _int(1, optional=True), _float()
#: a threshold on a cosine similarity of unit descriptors (pixel, SSCD, CLIP): outside [-1, 1]
#: it flags nothing or everything
COSINE = _float(-1.0, 1.0)

#: groups shared by several stages (declared once)
TORCH: dict[str, Check] = {"seed": _int(0), "threads": COUNT_OR_NULL, "device": check_device}
SAMPLING: dict[str, Check] = {
    "steps": COUNT,
    "guidance_scale": _float(0.0),
    "n_per_prompt": COUNT,
    "batch_size": COUNT,
    "resolution": COUNT,
}
FIT: dict[str, Check] = {
    "steps": COUNT,
    "batch_size": COUNT,
    "lr": _float(above=0.0),
    "warmup": _int(0),
    "ckpt_every": COUNT,
    "decay_from": _int(0, optional=True),
    "ema_decay": _float(0.0, 1.0, optional=True),
    "gradient_accumulation_steps": COUNT,
}
REPLICATION: dict[str, Check] = {"threshold": COSINE, "max_targets": COUNT_OR_NULL}


def _under(prefix: str, fields: dict[str, Check]) -> dict[str, Check]:
    return {f"{prefix}.{key}": check for key, check in fields.items()}


SCHEMAS: dict[str, dict[str, Check]] = {
    "train": {
        **TORCH,
        "resolution": COUNT,
        **_under("unet", {**FIT, "steps": _int(0)}),  # 0: the VAE alone
        "unet.caption_dropout": _float(0.0, 1.0),
        **_under("vae", {**FIT, "steps": _int(0)}),
        "vae.kl_weight": _float(0.0),
    },
    "generate": {**TORCH, **SAMPLING},
    "embed": {
        **TORCH,
        "batch_size": COUNT,
        "part_size": COUNT,
        "num_workers": _int(0),
        "resolution": COUNT_OR_NULL,
        "features.extractor.device": check_device,
    },
    "index": {
        "seed": _int(0),
        "threads": COUNT_OR_NULL,
        "recall.queries": _int(0, optional=True),
        "recall.noise": _float(0.0),
        "recall.k": COUNT,
    },
    "search": {"k": COUNT, "normalisation.k": COUNT, "normalisation.beta": FINITE},
    "dedup": {
        **TORCH,
        "threshold": _float(-1.0, 1.0),
        "representative": partial(check_choice, choices=("central", "first")),
        "report.top_groups": _int(0),
        "report.per_group": COUNT,
    },
    "detect": {
        **TORCH,
        "batch_size": COUNT,
        "resolution": COUNT,
        "ci_level": _float(above=0.0, maximum=1.0, optional=True),
    },
    "audit": {**TORCH, "n_per_prompt": COUNT, "k": COUNT, "threshold": COSINE, "dcr_threshold": COSINE},
    "probe": {**TORCH, **SAMPLING, **REPLICATION, "n_controls": _int(0)},
    "generalise": {
        **TORCH,
        "resolution": COUNT,
        **_under("unet", FIT),
        "n": COUNT,
        "samples": _int(2),
        "sample_steps": COUNT,
        "batch_size": COUNT,
    },
    "mitigate": {
        **TORCH,
        **SAMPLING,
        **_under("mitigation", {**FIT, "refresh_every": COUNT}),
        "mitigation.publish": partial(check_choice, choices=("adapter", "pipeline")),
        "objectives.n_prompts": COUNT,
        "objectives.n_per_prompt": COUNT,
    },
    "evaluate-mitigation": {
        **TORCH,
        **SAMPLING,
        **REPLICATION,
        "utility.n_prompts": COUNT,
        "utility.n_per_prompt": COUNT,
    },
}

#: stages that run others on a sub-config: node -> the sub-stage whose schema applies
SUB_STAGES = {"audit": {"generate": "generate", "embed": "embed", "index_stage": "index"}, "dedup": {"embed": "embed"}}

_ABSENT = object()


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at dotted ``key``, or ``_ABSENT`` when the config has no such key or
    leaves it unset (``???``: the stage's own check says what to set)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node or OmegaConf.is_missing(node, leaf):
        return _ABSENT
    return node[leaf]


def check_fields(stage: str, cfg: DictConfig, prefix: str = "") -> None:
    """Check every field of ``stage``'s schema present in ``cfg`` (and its sub-stages' nodes)."""
    for key, check in SCHEMAS[stage].items():
        try:
            value = _value(cfg, key)
        except OmegaConfBaseException as err:  # an interpolation that does not resolve
            raise ConfigError(f"{prefix}{key}: {str(err).splitlines()[0]}") from None
        if value is not _ABSENT:
            check(value, prefix + key)
    for node, sub in SUB_STAGES.get(stage, {}).items():
        if isinstance(cfg.get(node), DictConfig):
            check_fields(sub, cfg[node], f"{prefix}{node}.")


#: the pipeline precision of a stage's models (``precision``: evaluate-mitigation's, for all of them)
PRECISION_KEYS = ("model.precision", "precision")


def settle_precision(cfg: DictConfig) -> None:
    """fp16 on the CPU runs as fp32 (:func:`~diffmem.models.pipeline.resolve_dtype`): set it so in
    ``cfg``, with one log line, so that ``info.json`` and the fingerprint record what ran."""
    for key in PRECISION_KEYS:
        if str(_value(cfg, key)) not in ("fp16", "float16"):  # float16: its older name
            continue
        device = cfg.get("device", "auto")
        if resolve_device(device).type == "cpu":
            log.warning("%s=fp16 on the CPU (device=%s) runs as fp32; the run records fp32", key, device)
            OmegaConf.update(cfg, key, "fp32", merge=False)


def validate(stage: str, cfg: DictConfig) -> None:
    """Refuse ``cfg`` of ``stage`` (a one-line ConfigError) when a field is out of its schema or
    its run dir cannot be made; called before the stage function, so before any claim."""
    check_run_name(cfg.get("name", "-"))
    check_fields(stage, cfg)
    check_run_dir(cfg.run_dir)
