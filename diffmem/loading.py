"""One loader for every model a stage names: a diffusers pipeline or a defence wrapper over one.

Above :mod:`diffmem.models` (plain pipelines) and :mod:`diffmem.mitigations.defences` (the
wrapper format), so neither needs the other: a wrapper folder loads as its base pipeline
with the defence attached as sampler hooks (:func:`diffmem.sampling.set_hooks`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from diffmem.errors import DataError
from diffmem.mitigations.defences import is_defence, read_defence
from diffmem.models import load_pipeline
from diffmem.sampling import set_hooks


def load_model(model: Mapping | str | os.PathLike, device: str | torch.device = "cpu", *,
               dtype: str | None = None, scheduler: str | None = None):
    """The pipeline of a model config (``path``, ``dtype``, ``local_files_only``) or of a path.

    A path (or a config without them) means ``float32`` and offline; ``dtype`` overrides the
    config's. A defence wrapper loads its base model (with the same settings) with the
    defence as the pipeline's sampler hooks; defences do not stack.
    """
    spec = {"path": model} if isinstance(model, (str, os.PathLike)) else model
    path, local_files_only = spec["path"], spec.get("local_files_only", True)
    dtype = dtype or spec.get("dtype", "float32")
    if not is_defence(path):
        return load_pipeline(path, device, dtype, local_files_only, scheduler)
    base, defence = read_defence(path)
    if is_defence(base):
        raise DataError(f"{os.path.expanduser(path)}: wraps another defence ({base}); defences do not stack")
    return set_hooks(load_pipeline(base, device, dtype, local_files_only, scheduler), defence)
