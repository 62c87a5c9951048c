"""CPU shim for a torchvision wheel whose C extension cannot load.

The pinned torchvision 0.28.0 wheel is a CUDA build. Beside the CPU torch wheel its
``_C`` extension fails to load, and ``import torchvision`` then dies registering fake
kernels for ``torchvision::nms``/``qnms`` (which no longer exist). That breaks every
package that imports torchvision (open_clip, timm, some transformers/peft paths).

``apply()`` tries to load the extension exactly as torchvision would; only when that
fails does it define the two missing op *schemas* (no kernels: calling them still
raises, as torchvision's own ``_assert_has_ops`` does). On a working install it is a
no-op. ``install()`` puts a meta-path hook in place so ``apply()`` runs right before
torchvision is first imported, whatever imports it. The installed
``diffmem_torchvision_shim.pth`` calls it at every interpreter start (launchers such as
``accelerate launch`` import torchvision before any diffmem code), and the package's ``__init__``
calls it too. ``install()`` imports nothing heavy; torch is only imported when torchvision is.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_state: dict[str, Any] = {"applied": False, "shimmed": False, "lib": None}


def _extension_path() -> str | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    for name in os.listdir(folder):
        if name.startswith("_C.") and name.endswith((".so", ".pyd")):
            return os.path.join(folder, name)
    return None


def apply() -> bool:
    """Define torchvision's missing op schemas if its extension cannot load.

    Returns True when the shim was needed (and applied), False otherwise.
    """
    if _state["applied"]:
        return _state["shimmed"]
    _state["applied"] = True
    path = _extension_path()
    if path is None:  # torchvision not installed: nothing to fix
        return False
    import torch

    try:
        torch.ops.load_library(path)
        return False
    except (ImportError, OSError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _MISSING_SCHEMAS.items():
        if not torch._C._dispatch_has_kernel(f"torchvision::{name}"):
            with contextlib.suppress(RuntimeError):  # already defined by someone else
                lib.define(schema)
    _state["lib"] = lib  # the Library must stay alive or its definitions go away
    _state["shimmed"] = True
    return True


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """Runs ``apply()`` once, just before the first ``import torchvision``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        apply()
        return None  # let the normal finders import torchvision


def install() -> None:
    """Arrange for ``apply()`` to run before torchvision's first import."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionHook())
