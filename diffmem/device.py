"""Explicit device choice (diffusers style): ``auto`` picks CUDA when present, else CPU.

torch is imported only where a device must be looked up (``cuda``, ``mps``, resolving
``auto``), so checking a config and running an ONNX descriptor never import it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from diffmem.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig


def check_device(device: object, name: str = "device") -> str:
    """``device`` if this machine has it: ``auto``, ``cpu``, ``cuda``, ``cuda:<i>`` or ``mps``
    (a one-line ConfigError naming the field otherwise, before any work starts); null is auto."""
    text = "auto" if device is None else str(device)
    m = re.fullmatch(r"(auto|cpu|cuda|mps)(?::(\d+))?", text)
    if m is None or m[2] is not None and m[1] != "cuda":
        raise ConfigError(f"{name}={text!r} is not a device (auto, cpu, cuda, cuda:<index> or mps)")
    if m[1] in ("cuda", "mps"):
        import torch
    if m[1] == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if m[2] is None and count == 0 or m[2] is not None and int(m[2]) >= count:
            raise ConfigError(
                f"{name}={text}: this machine has {count} CUDA device{'s' * (count != 1)}"
                f" (use {name}=auto or {name}=cpu)"
            )
    if m[1] == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{name}=mps: MPS is not available on this machine (use {name}=auto or {name}=cpu)")
    return text


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None -> cuda if available else cpu; anything else as given. In a data-parallel
    job ``auto`` and ``cuda`` are this rank's GPU (the local rank's, when the node's GPUs are
    all visible to every rank), made the current one."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "auto", "cuda") and torch.cuda.is_available():
        from diffmem.distributed import ranks

        r = ranks()
        if r.world_size > 1:
            torch.cuda.set_device(r.local_rank % torch.cuda.device_count())
            return torch.device("cuda", torch.cuda.current_device())
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def configure_torch(cfg: DictConfig) -> torch.device:
    """A stage's torch setup from its config: CPU threads (``threads``, null = torch's
    default) and the device (``device``, default ``auto``)."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    return resolve_device(cfg.get("device", "auto"))
