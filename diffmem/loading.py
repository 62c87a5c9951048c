"""One loader for every model a stage names: a diffusers pipeline, a LoRA adapter folder over
one, or a wrapper over either (a defence).

Above :mod:`diffmem.models` (plain pipelines). Wrapper formats are a hook: each is a reader
registered in :data:`diffmem.registry.MODEL_WRAPPERS` (the defence format by the package
root), so this module imports no method. A wrapper folder loads as its base pipeline with the
wrapper's sampler hooks attached (:func:`diffmem.sampling.set_hooks`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from diffmem.errors import DataError
from diffmem.models import load_pipeline
from diffmem.models.adapters import apply_adapter, is_adapter, read_adapter
from diffmem.models.pipeline import check_precision
from diffmem.registry import MODEL_WRAPPERS
from diffmem.sampling import SamplerHooks, set_hooks

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline


def model_precision(spec: Mapping) -> str:
    """A model config's ``precision`` (its older name ``dtype`` is read too; default ``fp32``)."""
    return check_precision(spec.get("precision") or spec.get("dtype") or "fp32")


def load_model(
    model: Mapping | str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    precision: str | None = None,
    scheduler: str | None = None,
) -> StableDiffusionPipeline:
    """The pipeline of a model config (``path``, ``precision``, ``local_files_only``,
    ``vae_slicing``, ``vae_tiling``) or of a path.

    A path (or a config without them) means ``fp32`` and offline; ``precision`` overrides the
    config's. An adapter folder loads its base with the adapter fused into the UNet
    (:mod:`diffmem.models.adapters`). A wrapper (a defence) loads its base model (with the same
    settings) with the wrapper as the pipeline's sampler hooks; wrappers do not stack.
    """
    spec = {"path": model} if isinstance(model, (str, os.PathLike)) else model
    path = spec["path"]
    precision = check_precision(precision) if precision else model_precision(spec)
    settings = dict(
        local_files_only=spec.get("local_files_only", True),
        scheduler=scheduler,
        vae_slicing=bool(spec.get("vae_slicing", False)),
        vae_tiling=bool(spec.get("vae_tiling", False)),
    )
    wrapper = _wrapper(path)
    if wrapper is None:
        return _weights(path, device, precision, settings)
    kind, base, hooks = wrapper
    if _wrapper(base) is not None:
        raise DataError(f"{os.path.expanduser(path)}: wraps another {kind} ({base}); {kind}s do not stack")
    return set_hooks(_weights(base, device, precision, settings), hooks)


def _wrapper(path: str | os.PathLike[str]) -> tuple[str, str, SamplerHooks] | None:
    """(format name, base model, sampler hooks) when ``path`` is a folder of a registered
    wrapper format, else None."""
    for kind in MODEL_WRAPPERS.names():
        found = MODEL_WRAPPERS.get(kind)(path)
        if found is not None:
            return (kind, *found)
    return None


def _weights(
    path: str | os.PathLike[str], device: str | torch.device, precision: str, settings: dict
) -> StableDiffusionPipeline:
    """The pipeline at ``path``: a diffusers folder or repo id, or an adapter folder (its base,
    loaded the same way, with the adapter fused in)."""
    if not is_adapter(path):
        return load_pipeline(path, device, precision, **settings)
    base, _ = read_adapter(path)
    wrapper = _wrapper(base)
    if wrapper is not None:
        raise DataError(f"{os.path.expanduser(path)}: an adapter over a {wrapper[0]} ({base}); adapt the plain model")
    return apply_adapter(_weights(base, device, precision, settings), path)
