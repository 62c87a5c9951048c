"""One loader for every SD-style diffusers pipeline: Stable Diffusion and the testbed alike."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffmem.checks import did_you_mean
from diffmem.errors import ConfigError, DataError

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
#: ``model.precision``: the dtype a pipeline runs in (``model.dtype``'s old names still work)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MODEL_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline


def is_pipeline_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a saved diffusers pipeline."""
    return (Path(path) / MODEL_INDEX).exists()


def check_precision(precision: str) -> str:
    """``fp32``/``bf16``/``fp16`` (``float32``/``bfloat16``/``float16`` map to them); else a ConfigError."""
    name = _ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        raise ConfigError(
            f"model.precision '{precision}' is not one of {', '.join(PRECISIONS)}."
            f"{did_you_mean(str(precision), PRECISIONS, n=1)}"
        )
    return name


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of ``precision`` on ``device``. bf16 runs in bf16 on the CPU too (so CPU tests
    catch half-precision bugs); fp16 on the CPU falls back to fp32 (few fast fp16 CPU kernels)."""
    name = check_precision(precision)
    if name == "fp16" and torch.device(device).type == "cpu":
        return torch.float32
    return PRECISIONS[name]


def check_scheduler(name: str | None) -> None:
    """A ConfigError with close matches unless ``name`` is None or a key of :data:`SCHEDULERS`."""
    if name is not None and name not in SCHEDULERS:
        raise ConfigError(
            f"scheduler '{name}' is not one of {', '.join(SCHEDULERS)}.{did_you_mean(name, SCHEDULERS, n=2)}"
        )


def set_scheduler(pipe: StableDiffusionPipeline, name: str | None) -> StableDiffusionPipeline:
    """Swap the pipeline's scheduler for ``name`` keeping its noise schedule config."""
    if name is None:
        return pipe
    check_scheduler(name)
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    return pipe


def load_pipeline(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    local_files_only: bool = True,
    scheduler: str | None = None,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` from a local folder or an HF-cache repo id.

    Safetensors only, no safety checker, never remote code; offline unless
    ``local_files_only`` is False. ``vae_slicing`` decodes/encodes a batch one image at a
    time and ``vae_tiling`` in overlapping tiles (bounded VAE memory at 512 px and above).
    (Stages load through :func:`diffmem.loading.load_model`,
    which also takes defence wrappers.)
    """
    import diffusers
    import transformers
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    check_scheduler(scheduler)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(device) if not isinstance(device, torch.device) else device
    local = Path(path).expanduser()
    if local.exists() and not is_pipeline_dir(local):
        raise DataError(f"{local}: not a diffusers pipeline folder (no {MODEL_INDEX})")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if local.exists() else str(path),
            dtype=resolve_dtype(precision, device),
            use_safetensors=True,
            local_files_only=local_files_only,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot load pipeline '{path}': {first}") from err
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    pipe.to(device)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return pipe


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """A fresh ``.<name>.tmp`` folder beside ``out_dir`` to write into; on success it replaces
    ``out_dir``, so a kill never leaves a half-written model folder in place."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def save_pipeline(pipe: StableDiffusionPipeline, out_dir: str | Path, dtype: str = "float32") -> Path:
    """``save_pretrained`` in safetensors (weights cast to ``dtype`` on disk) into a temp
    folder, then rename into place. The pipeline in memory is left as it was."""
    import copy

    if dtype not in _DTYPES:
        raise ConfigError(f"save dtype '{dtype}' is not one of {', '.join(_DTYPES)}")
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    cast = any(p.dtype != _DTYPES[dtype] for m in modules for p in m.parameters())
    on_disk = copy.deepcopy(pipe).to(dtype=_DTYPES[dtype]) if cast else pipe
    with staged_dir(out_dir) as tmp:
        on_disk.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)
