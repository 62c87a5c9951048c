"""One loader for every SD-style diffusers pipeline: Stable Diffusion and the testbed alike."""

from __future__ import annotations

from pathlib import Path

import torch

from diffmem.checks import did_you_mean
from diffmem.errors import ConfigError, DataError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype '{dtype}' is not one of {', '.join(_DTYPES)}")
    return torch.float32 if device.type == "cpu" else _DTYPES[dtype]  # fp32 on CPU


def check_scheduler(name: str | None) -> None:
    """A ConfigError with close matches unless ``name`` is None or a key of :data:`SCHEDULERS`."""
    if name is not None and name not in SCHEDULERS:
        raise ConfigError(f"scheduler '{name}' is not one of {', '.join(SCHEDULERS)}."
                          f"{did_you_mean(name, SCHEDULERS, n=2)}")


def set_scheduler(pipe, name: str | None):
    """Swap the pipeline's scheduler for ``name`` keeping its noise schedule config."""
    if name is None:
        return pipe
    check_scheduler(name)
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    return pipe


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32",
                  local_files_only: bool = True, scheduler: str | None = None):
    """A ``StableDiffusionPipeline`` from a local folder or an HF-cache repo id.

    Safetensors only, no safety checker, never remote code; offline unless
    ``local_files_only`` is False. (Stages load through :func:`diffmem.loading.load_model`,
    which also takes defence wrappers.)
    """
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    check_scheduler(scheduler)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(device) if not isinstance(device, torch.device) else device
    local = Path(path).expanduser()
    if local.exists() and not (local / "model_index.json").exists():
        raise DataError(f"{local}: not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if local.exists() else str(path),
            dtype=resolve_dtype(dtype, device),
            use_safetensors=True,
            local_files_only=local_files_only,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, EnvironmentError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot load pipeline '{path}': {first}") from err
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return pipe


def save_pipeline(pipe, out_dir: str | Path, dtype: str = "float32") -> Path:
    """``save_pretrained`` in safetensors (weights cast to ``dtype`` on disk) into a temp
    folder, then rename into place. The pipeline in memory is left as it was."""
    import copy
    import os
    import shutil

    if dtype not in _DTYPES:
        raise ConfigError(f"save dtype '{dtype}' is not one of {', '.join(_DTYPES)}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    on_disk = pipe if dtype == "float32" else copy.deepcopy(pipe).to(dtype=_DTYPES[dtype])
    on_disk.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
