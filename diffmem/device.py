"""Explicit device choice (diffusers style): ``auto`` picks CUDA when present, else CPU."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None -> cuda if available else cpu; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def configure_torch(cfg) -> torch.device:
    """A stage's torch setup from its config: CPU threads (``threads``, null = torch's
    default) and the device (``device``, default ``auto``)."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    return resolve_device(cfg.get("device", "auto"))
