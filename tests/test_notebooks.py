"""The notebooks run top to bottom (nbmake) and are committed without outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in cells if c["cell_type"] == "code")


#: notebooks whose run takes minutes (a MemControl study, two fine-tunes and their
#: evaluation): their stages are covered by the default suite, the notebook by ``-m slow``
SLOW = {"compare_mitigations.ipynb"}


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p for p in NOTEBOOKS], ids=lambda p: p.name
)
def test_notebook_runs(path, shipped_audit_outputs):
    env = {**os.environ, "DIFFMEM_OUTPUTS": str(shipped_audit_outputs)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbmake",
            str(path),
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "--nbmake-timeout=900",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:]
