"""The CPU torchvision shim (``diffmem._torchvision_shim``): armed by ``import diffmem``,
every heavy import works in a fresh process; a process without diffmem is left alone."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import pytest

IMPORTS = [
    "import torchvision",
    "import open_clip",
    "from transformers import CLIPTextModel",
    "import peft",
    "import diffusers; from diffusers import StableDiffusionPipeline",
    "import timm",
]


@pytest.mark.parametrize("statement", IMPORTS)
def test_import_after_diffmem_in_fresh_process(statement):
    out = subprocess.run([sys.executable, "-c", f"import diffmem.errors; {statement}"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_shim_is_scoped_to_diffmem():
    """Importing torch (what every process here does) arms nothing; importing diffmem does."""
    code = ("import sys, torch; names = lambda: [type(f).__name__ for f in sys.meta_path]; "
            "before = '_TorchvisionHook' in names(); import diffmem; print(before, '_TorchvisionHook' in names())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    stale = [str(p) for p in map(Path, site.getsitepackages()) if (p / "diffmem_compat.pth").exists()]
    assert not stale, f"{stale[0]}/diffmem_compat.pth (an older install) arms the shim at every start: pip install -e ."
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]


def test_apply_is_idempotent_and_only_shims_when_needed():
    from diffmem import _torchvision_shim

    first = _torchvision_shim.apply()
    assert _torchvision_shim.apply() == first
    import torch
    import torchvision  # noqa: F401

    # Either the real extension loaded (no shim) or the schemas exist without kernels.
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
    if first:
        with pytest.raises(Exception):
            torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
