"""Load SD-style pipelines (local folder or HF cache) and build the testbed architecture."""

from diffmem.device import resolve_device
from diffmem.models.pipeline import load_pipeline, save_pipeline

__all__ = ["load_pipeline", "save_pipeline", "resolve_device"]
