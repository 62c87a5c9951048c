"""Every check CI runs, in CI's order: ``python -m diffmem.tools.check``.

1. lint: ``ruff check`` (rules and waivers in ``pyproject.toml``);
2. format: ``ruff format --check``;
3. types: ``mypy`` on ``diffmem/`` (settings in ``pyproject.toml``; the baseline is 0 errors);
4. layers: the import rule of docs/architecture.md (:mod:`diffmem.tools.layers`);
5. tests: ``pytest -q``, the default suite (slow tests are deselected by ``pyproject.toml``).

It stops at the first check that fails, naming it and the command to reproduce it, and exits 1.
``--fix`` first applies ruff's fixes and formatting; ``--no-tests`` stops after the layers;
arguments after ``--`` go to pytest. ``.ci/run`` runs it from a fresh install (the README's
test command), and ``.pre-commit-config.yaml`` runs steps 1-4 on a commit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

#: the repository root (the checks need its pyproject.toml, tests and docs: an editable install)
ROOT = Path(__file__).resolve().parents[2]


def steps(pytest_args: list[str]) -> list[tuple[str, list[str]]]:
    """``(name, command)`` of every check, in the order CI runs them."""
    py = sys.executable
    return [
        ("lint", [py, "-m", "ruff", "check", "."]),
        ("format", [py, "-m", "ruff", "format", "--check", "."]),
        ("types", [py, "-m", "mypy"]),
        ("layers", [py, "-m", "diffmem.tools.layers"]),
        ("tests", [py, "-m", "pytest", "-q", *pytest_args]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true", help="apply ruff's fixes and formatting first")
    parser.add_argument("--no-tests", action="store_true", help="stop after the static checks")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args(argv)
    if not (ROOT / "pyproject.toml").is_file():
        print(f"check: {ROOT} is no source checkout (install with pip install -e)", file=sys.stderr)
        return 2
    if args.fix:
        for cmd in (["check", "--fix", "-q", "."], ["format", "-q", "."]):
            subprocess.run([sys.executable, "-m", "ruff", *cmd], cwd=ROOT, check=False)
    for name, cmd in steps(args.pytest_args):
        if name == "tests" and args.no_tests:
            break
        print(f"check: {name}: {' '.join(Path(c).name if c == sys.executable else c for c in cmd)}", flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
            hint = " (python -m diffmem.tools.check --fix applies ruff's fixes)" if name in ("lint", "format") else ""
            print(f"check: {name} failed{hint}", file=sys.stderr)
            return 1
        print(f"check: {name} passed in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
