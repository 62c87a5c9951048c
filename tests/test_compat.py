"""The CPU torchvision shim (``diffmem._torchvision_shim``): armed by ``import diffmem``,
every heavy import works in a fresh process; a process without diffmem is left alone."""

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
def test_import_after_diffmem_in_fresh_process(statement):
    out = subprocess.run([sys.executable, "-c", f"import diffmem.errors; {statement}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_shim_is_armed_at_interpreter_start_for_launchers():
    """Launchers import torchvision before any diffmem code (accelerate's CLI imports timm): the
    installed .pth arms the hook in every interpreter, and accelerate's CLI starts."""
    code = "import sys; print('_TorchvisionHook' in [type(f).__name__ for f in sys.meta_path], 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # armed, and light: every Python process of the environment runs it (numpy alone is ~0.1 CPU-s)
    assert out.stdout.split() == ["True", "False"], out.stderr[-2000:]
    cli = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0 and "num_processes" in cli.stdout, cli.stderr[-2000:]


def test_apply_is_idempotent_and_only_shims_when_needed():
    from diffmem import _torchvision_shim

    first = _torchvision_shim.apply()
    assert _torchvision_shim.apply() == first
    import torch
    import torchvision  # noqa: F401

    # Either the real extension loaded (no shim) or the schemas exist without kernels.
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
    if first:
        with pytest.raises(RuntimeError):  # a schema without a kernel
            torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
