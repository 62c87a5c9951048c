"""One loader for every model a stage names: a diffusers pipeline, a LoRA adapter folder over
one, or a defence wrapper over either.

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
from diffmem.models.adapters import apply_adapter, is_adapter, read_adapter
from diffmem.models.pipeline import check_precision
from diffmem.sampling import set_hooks


def model_precision(spec: Mapping) -> str:
    """A model config's ``precision`` (its older name ``dtype`` is read too; default ``fp32``)."""
    return check_precision(spec.get("precision") or spec.get("dtype") or "fp32")


def load_model(model: Mapping | str | os.PathLike, device: str | torch.device = "cpu", *,
               precision: str | None = None, scheduler: str | None = None):
    """The pipeline of a model config (``path``, ``precision``, ``local_files_only``,
    ``vae_slicing``, ``vae_tiling``) or of a path.

    A path (or a config without them) means ``fp32`` and offline; ``precision`` overrides the
    config's. An adapter folder loads its base with the adapter fused into the UNet
    (:mod:`diffmem.models.adapters`). A defence wrapper loads its base model (with the same
    settings) with the defence as the pipeline's sampler hooks; defences do not stack.
    """
    spec = {"path": model} if isinstance(model, (str, os.PathLike)) else model
    path = spec["path"]
    precision = check_precision(precision) if precision else model_precision(spec)
    settings = dict(local_files_only=spec.get("local_files_only", True), scheduler=scheduler,
                    vae_slicing=bool(spec.get("vae_slicing", False)), vae_tiling=bool(spec.get("vae_tiling", False)))
    if not is_defence(path):
        return _weights(path, device, precision, settings)
    base, defence = read_defence(path)
    if is_defence(base):
        raise DataError(f"{os.path.expanduser(path)}: wraps another defence ({base}); defences do not stack")
    return set_hooks(_weights(base, device, precision, settings), defence)


def _weights(path, device, precision: str, settings: dict):
    """The pipeline at ``path``: a diffusers folder or repo id, or an adapter folder (its base,
    loaded the same way, with the adapter fused in)."""
    if not is_adapter(path):
        return load_pipeline(path, device, precision, **settings)
    base, _ = read_adapter(path)
    if is_defence(base):
        raise DataError(f"{os.path.expanduser(path)}: an adapter over a defence ({base}); adapt the plain model")
    return apply_adapter(_weights(base, device, precision, settings), path)
