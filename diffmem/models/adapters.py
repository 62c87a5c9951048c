"""LoRA adapter folders: a fine-tuned model published as its adapter plus a reference to its base.

A LoRA mitigation changes a few MB of weights; publishing a whole pipeline per run (4 GB in
fp32 on SD v1.4, per trial of a MemControl study) fills a disk. An adapter folder holds
``adapter.json`` (``{"base", "lora"}``: the base model as given, a repo id or an absolute
local path, and the peft ``LoraConfig`` fields, or ``null`` for a run that trained nothing)
and ``lora.safetensors`` (the adapter weights, fp32 as trained). This module owns that
format; :func:`diffmem.loading.load_model` loads such a folder as its base pipeline with the
adapter fused into the UNet in the pipeline's precision, so every stage takes it as
``model=local model.path=<folder>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.errors import DataError

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

ADAPTER_FILE = "adapter.json"
WEIGHTS_FILE = "lora.safetensors"
_FIELDS = ("r", "lora_alpha", "target_modules")


def model_reference(base: str | Path) -> str:
    """``base`` as a reference that loads from any working directory: an existing local path made
    absolute, anything else (a repo id) kept as given."""
    local = Path(base).expanduser()
    return str(local.resolve()) if local.exists() else str(base)


def is_adapter(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is an adapter folder (holds ``adapter.json``)."""
    return (Path(folder).expanduser() / ADAPTER_FILE).exists()


def save_adapter(out_dir: str | Path, unet: UNet2DConditionModel, base: str | Path) -> Path:
    """Publish ``unet``'s LoRA adapter (none: the base unchanged) over the model at ``base``.

    Written into a temporary folder renamed into place, so a kill leaves no half folder.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from diffmem.models.pipeline import staged_dir
    from diffmem.runs import write_json

    with staged_dir(out_dir) as tmp:
        lora = None
        if getattr(unet, "_hf_peft_config_loaded", False):
            config = unet.peft_config["default"]
            lora = {
                "r": int(config.r),
                "lora_alpha": float(config.lora_alpha),
                "target_modules": sorted(config.target_modules),
            }
            state = get_peft_model_state_dict(unet, adapter_name="default")
            save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        write_json(tmp / ADAPTER_FILE, {"base": model_reference(base), "lora": lora})
    return Path(out_dir)


def read_adapter(folder: str | os.PathLike[str]) -> tuple[str, dict | None]:
    """(base model: repo id or path, LoRA config fields or None) of an adapter folder."""
    from diffmem.data.datasets import check_regular
    from diffmem.runs import read_json

    path = Path(folder).expanduser() / ADAPTER_FILE
    check_regular(path)
    spec = read_json(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("base"), str):
        raise DataError(f"{path}: expected a JSON object with a string 'base' and 'lora'")
    lora = spec.get("lora")
    if lora is not None and not (isinstance(lora, dict) and all(k in lora for k in _FIELDS)):
        raise DataError(f"{path}: field 'lora' must be null or hold {', '.join(_FIELDS)}")
    return spec["base"], lora


def fuse_lora(unet: UNet2DConditionModel) -> None:
    """Fold the UNet's LoRA adapters into its weights (a plain diffusers UNet again)."""
    if getattr(unet, "_hf_peft_config_loaded", False):
        unet.fuse_lora()
        unet.unload_lora()


def apply_adapter(pipe: StableDiffusionPipeline, folder: str | os.PathLike[str]) -> StableDiffusionPipeline:
    """``pipe`` (the adapter's base) with the adapter of ``folder`` fused into its UNet."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    _, lora = read_adapter(folder)
    if lora is None:
        return pipe
    weights = Path(folder).expanduser() / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises several types for a missing or damaged file
        raise DataError(f"{weights}: unreadable adapter weights ({type(err).__name__})") from err
    unet = pipe.unet
    unet.add_adapter(
        LoraConfig(
            r=int(lora["r"]),
            lora_alpha=float(lora["lora_alpha"]),  # type: ignore[arg-type]  # peft annotates int; a float alpha works (alpha / r)
            target_modules=list(lora["target_modules"]),
        )
    )
    expected = set(get_peft_model_state_dict(unet, adapter_name="default"))
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[0]
        raise DataError(
            f"{weights}: not an adapter for this base UNet (e.g. '{odd}' "
            f"{'is missing' if odd in expected else 'is not in the UNet'})"
        )
    set_peft_model_state_dict(unet, state, adapter_name="default")
    with torch.no_grad():
        fuse_lora(unet)
    unet.requires_grad_(False)
    return pipe
