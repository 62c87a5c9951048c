"""The CPU torchvision shim: every heavy import works first in a fresh process."""

from __future__ import annotations

import subprocess
import sys

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
def test_import_first_in_fresh_process(statement):
    out = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_apply_is_idempotent_and_only_shims_when_needed():
    from diffmem import _compat

    first = _compat.apply()
    assert _compat.apply() == first
    import torch
    import torchvision  # noqa: F401

    # Either the real extension loaded (no shim) or the schemas exist without kernels.
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
    if first:
        with pytest.raises(Exception):
            torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
