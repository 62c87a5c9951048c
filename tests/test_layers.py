"""The import rule (docs/architecture.md), checked by ``python -m diffmem.tools.layers``."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import diffmem
from diffmem.tools.layers import LAYERS, check, stage_modules

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_package_follows_the_import_rule():
    """What `python -m diffmem.tools.layers` checks: no violation at all."""
    violations = check(Path(diffmem.__file__).parent, "diffmem", stage_modules())
    assert violations == [], "\n".join(violations)


def test_layers_are_the_ones_docs_architecture_lists():
    """docs/architecture.md section 2 names, layer by layer, what LAYERS checks."""
    section = ARCHITECTURE.read_text().split("## 2.")[1].split("\n## ")[0]
    for (name, members), bullet in zip(LAYERS, section.split("\n- **")[1:]):
        assert bullet.lower().startswith(name), (name, bullet[:40])
        text, depth = "", 0
        for ch in bullet.split(":", 1)[1]:  # the names outside parentheses
            depth += (ch == "(") - (ch == ")")
            text += ch if depth == 0 else ""
        listed = {
            m.rstrip("/").removesuffix(".py") for m in re.findall(r"`([\w/.]+)`", text) if m.endswith(("/", ".py"))
        }
        assert listed == set(members), (name, sorted(listed ^ set(members)))


def test_stage_modules_come_from_the_stage_registry():
    assert {"train", "generate", "index.stage", "evaluate_mitigation"} <= set(stage_modules())
    assert "config" not in stage_modules() and "runs" not in stage_modules()


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "fakepkg"
    for name, text in {"__init__.py": "", "models/__init__.py": "", "probes/__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return pkg


CLEAN = {
    "train.py": "from fakepkg.engine import fit\nSAMPLES = 'samples.parquet'\n",
    "engine.py": "import fakepkg.models.loader\n\ndef fit():\n    pass\n",
    "models/loader.py": "import json\n",
    "registry.py": "TARGETS = {'probe': 'fakepkg.probes.run:main'}\n",
    "probes/run.py": "from fakepkg.models.loader import *\n",
    "cli.py": "import fakepkg.train\n",
}


#: the fake package's layers, bottom up
FAKE_LAYERS = (
    ("base", ("a", "b", "c", "d", "reader", "lib")),
    ("models", ("models", "engine")),
    ("methods", ("probes",)),
    ("plugins", ("registry",)),
)


def test_checker_passes_a_clean_package(tmp_path):
    assert check(_package(tmp_path, CLEAN), "fakepkg", ["train"], layers=FAKE_LAYERS) == []


def test_checker_fails_on_each_rule(tmp_path):
    pkg = _package(
        tmp_path,
        {
            **CLEAN,
            # 1. a library importing a stage: at module level, inside a function, via a registry string
            "engine.py": "import fakepkg.models.loader\n\ndef fit():\n    from fakepkg.train import SAMPLES\n",
            "registry.py": "TARGETS = {'train': f'fakepkg.train:{1}'}\n",
            "lib.py": "from . import train\n",
            # 2. models using probes (lazily)
            "models/loader.py": "def load():\n    from fakepkg.probes import run\n",
            # 3. an import cycle a -> b -> c -> a (the lazy d -> a is no cycle)
            "a.py": "import fakepkg.b\n",
            "b.py": "from fakepkg import c\n",
            "c.py": "from .a import x\n",
            "d.py": "def f():\n    import fakepkg.a\n",
            # 4. a run-dir file name spelled in a second module
            "reader.py": "import pandas\n\ndef read(d):\n    return pandas.read_parquet(d / 'samples.parquet')\n",
        },
    )
    got = check(pkg, "fakepkg", ["train"], layers=FAKE_LAYERS)
    text = "\n".join(got)
    assert "fakepkg/engine.py:4: library fakepkg.engine references stage module fakepkg.train" in text
    assert "fakepkg/registry.py:1: library fakepkg.registry references stage module fakepkg.train" in text
    assert "fakepkg/lib.py:1: library fakepkg.lib references stage module fakepkg.train" in text
    assert "fakepkg/models/loader.py:2: fakepkg.models.loader references fakepkg.probes.run (models must" in text
    assert (
        "fakepkg/models/loader.py:2: fakepkg.models.loader (models) references fakepkg.probes.run "
        "(methods, a higher layer)"
    ) in got
    assert "import cycle: fakepkg.a -> fakepkg.b -> fakepkg.c -> fakepkg.a" in got
    assert "package cycle: a -> b -> c -> a" in got  # top-level modules are packages of their own
    assert "package cycle: models -> probes -> models" in got  # the lazy import above counts
    assert "run-dir file 'samples.parquet' is spelled in 2 modules (one owner): fakepkg.reader, fakepkg.train" in got
    assert len(got) == 9, text


def test_checker_fails_on_package_order_cycles_and_unlisted_packages(tmp_path):
    """Rule 5 (a lower layer referencing a higher one, lazily or by a registry string, or the
    stage layer; a package in no layer) and rule 6 (a cycle between the packages of one layer)."""
    pkg = _package(
        tmp_path,
        {
            **CLEAN,
            "lib.py": "TARGETS = {'probe': 'fakepkg.probes.run:main'}\n",  # base -> methods, by name
            "a.py": "def f():\n    import fakepkg.engine\n",  # base -> models, inside a function
            "models/x.py": "from fakepkg import engine\n",
            "engine.py": "def fit():\n    from fakepkg.models import x\n",  # models <-> engine: one layer
            "extra.py": "",
            "b.py": "from fakepkg import cli\n",  # the stage layer's dispatcher
        },
    )
    assert check(pkg, "fakepkg", ["train"], layers=FAKE_LAYERS) == [
        "fakepkg/extra.py: fakepkg.extra is in no layer (add it to diffmem.tools.layers.LAYERS and "
        "docs/architecture.md section 2)",
        "fakepkg/a.py:2: fakepkg.a (base) references fakepkg.engine (models, a higher layer)",
        "fakepkg/b.py:1: library fakepkg.b references fakepkg.cli (the stage layer)",
        "fakepkg/lib.py:1: fakepkg.lib (base) references fakepkg.probes.run (methods, a higher layer)",
        "package cycle: engine -> models -> engine",
    ]


def test_cli_exits_1_with_the_violations(tmp_path, monkeypatch):
    pkg = _package(tmp_path, {**CLEAN, "lib.py": "import fakepkg.train\n"})
    code = (
        "import sys; import diffmem.tools.layers as L; L.stage_modules = lambda: ['train']; "
        "sys.exit(L.main(['--root', sys.argv[1], '--package', 'fakepkg']))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(pkg)], capture_output=True, text=True)
    assert out.returncode == 1 and "fakepkg.lib references stage module fakepkg.train" in out.stdout
