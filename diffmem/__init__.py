"""diffmem: analyse and mitigate memorisation in text-to-image diffusion models.

Public API (what notebooks use; the CLI runs the same functions)::

    import diffmem
    cfg = diffmem.compose("generate", ["n_per_prompt=2"])   # a stage's config
    run_dir = diffmem.run("generate", ["n_per_prompt=2"])    # run a stage
    res = diffmem.load_run(run_dir)                           # its tables and metrics
"""

from __future__ import annotations

from typing import Any

from diffmem import _torchvision_shim
from diffmem.registry import MODEL_WRAPPERS as _WRAPPERS

_torchvision_shim.install()  # before anything diffmem loads imports torchvision (docs/shim.md)

__version__ = "0.1.0"
__all__ = ["compose", "run", "load_run", "__version__"]

# wired here, above every layer: model loading reads defence folders without importing a method
_WRAPPERS.register("defence", "diffmem.mitigations.defences:wrapped")


def __getattr__(name: str) -> Any:  # keep `import diffmem` light: torch etc. load on first use
    if name in ("compose", "run"):
        from diffmem import config

        return getattr(config, name)
    if name == "load_run":
        from diffmem.results import load_run

        return load_run
    raise AttributeError(f"module 'diffmem' has no attribute {name!r}")
