"""The import rule of docs/architecture.md, checked mechanically: ``python -m diffmem.tools.layers``.

A stdlib :mod:`ast` walk over the package (imports inside functions and lazy ``"pkg.mod:attr"``
registry strings included) that reports:

1. a module outside the stage layer referencing a stage module (the stage layer: the modules
   registered in :data:`diffmem.config.STAGES`, plus ``cli``, ``config``, the package
   ``__init__`` and ``__main__`` entry points);
2. ``models`` referencing ``mitigations`` or ``probes`` (model loading knows no method);
3. import cycles between modules (module-level imports, i.e. what runs at import time);
4. a run-dir file name of :data:`RUN_FILES` written as a string literal in more than one
   module (each run format has one owner that reads and writes it; ``tools`` aside);
5. a library referencing a package of a higher layer of :data:`LAYERS` (the bottom-up order
   of docs/architecture.md section 2; lazy imports and registry strings count) or the stage
   layer (``config``, ``cli``, ``tools``), or a library package or module in no layer;
6. a cycle between library packages (every reference counts, lazy ones included).

Prints one line per violation and exits 1 if there is any, 0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: modules (relative to the package) that may reference stage modules besides the stages
STAGE_LAYER = ("", "cli", "config")
#: package -> packages it must not reference (relative names)
FORBIDDEN = {"models": ("mitigations", "probes")}
#: distinctive run-dir file names: each may be spelled in one module only (its format's owner).
#: Names several formats share (info.json, prompts.parquet) are left out.
RUN_FILES = (
    "samples.parquet",
    "ids.parquet",
    "manifest.parquet",
    "index.faiss",
    "index_info.json",
    "empty.faiss",
    "index.ivfdata",
    "matches.parquet",
    "neurons.json",
    "masks.safetensors",
    "defence.json",
    "adapter.json",
    "lora.safetensors",
    "run.json",
    "inputs.json",
    "_SUCCESS",
    "items.parquet",
    "skipped.parquet",
    "metrics.json",
    "objectives.json",
    "train_log.parquet",
    "model_index.json",
    "roc.png",
    "checkpoints",
    "scores.parquet",
    "attribution.parquet",
)

#: docs/architecture.md section 2, bottom up: layer -> its top-level packages and modules. A
#: library may reference its own layer and those below; the stage layer (above) anything.
LAYERS = (
    (
        "foundation",
        (
            "errors",
            "checks",
            "schema",
            "registry",
            "runs",
            "runner",
            "device",
            "distributed",
            "results",
            "_torchvision_shim",
        ),
    ),
    ("data and models", ("data", "models", "sampling", "training", "loading")),
    ("measurement", ("features", "index", "metrics", "detectors")),
    ("methods", ("probes", "mitigations")),
    ("output", ("report",)),
)

_DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?::\w*)?$")


@dataclass(frozen=True)
class Ref:
    """``source`` references module ``target`` at ``line``; ``eager`` when it runs at import."""

    source: str
    target: str
    line: int
    eager: bool


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def references(module: str, path: Path, known: dict[str, Path]) -> Iterator[Ref]:
    """Every reference of ``module`` to another module of the package: imports (at any depth)
    and dotted ``"pkg.mod"`` / ``"pkg.mod:attr"`` strings (lazy registry targets)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]

    def visit(node: ast.AST, eager: bool) -> Iterator[Ref]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            eager = False
        if isinstance(node, ast.If) and _is_type_checking(node):
            eager = False
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, known)
                if target:
                    yield Ref(module, target, node.lineno, eager)
        elif isinstance(node, ast.ImportFrom):
            pkg = node.module or ""
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                pkg = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = (
                    _resolve(f"{pkg}.{alias.name}", known) if f"{pkg}.{alias.name}" in known else _resolve(pkg, known)
                )
                if target:
                    yield Ref(module, target, node.lineno, eager)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield from _string_ref(node.value, node.lineno)
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            head = str(node.values[0].value)  # f"pkg.mod:{name}" -> "pkg.mod:"
            if ":" in head:
                yield from _string_ref(head, node.lineno)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, eager)

    def _string_ref(text: str, line: int) -> Iterator[Ref]:
        m = _DOTTED.match(text)
        if m is None:
            return
        target = _resolve(m.group(1), known)
        if target and target != module and m.group(1) == target:
            yield Ref(module, target, line, False)

    yield from visit(tree, True)


def _within(module: str, package: str, prefix: str) -> bool:
    full = f"{package}.{prefix}" if prefix else package
    return module == full or module.startswith(full + ".")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                comps.append(set(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(edges):
        if v not in index:
            strong(v)
    out = []
    for comp in comps:  # shortest path back to the component's first module
        start = min(comp)
        prev: dict[str, str | None] = {start: None}
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in edges[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v] & comp):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in edges[v])
        path = [last]
        while (step := prev[path[-1]]) is not None:
            path.append(step)
        out.append([*reversed(path), start])
    return sorted(out)


def check(
    root: str | Path,
    package: str,
    stages: Iterable[str],
    run_files: Iterable[str] = RUN_FILES,
    layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS,
) -> list[str]:
    """The violations of the import rule in the package folder ``root`` (named ``package``);
    ``stages``: the stage modules, relative to the package (``"train"``, ``"index.stage"``);
    ``layers``: the library layers, bottom up (as :data:`LAYERS`)."""
    root = Path(root)
    known = modules(root, package)
    stage_mods = {f"{package}.{s}" for s in stages}
    refs = sorted(
        {r for m, p in known.items() for r in references(m, p, known) if r.target != m},
        key=lambda r: (r.source, r.line, r.target),
    )
    out = []

    def where(r: Ref) -> str:
        return f"{known[r.source].relative_to(root.parent)}:{r.line}"

    def in_stage_layer(m: str) -> bool:
        return (
            m in stage_mods
            or m.split(".")[-1] == "__main__"
            or _within(m, package, "tools")
            or any(m == (f"{package}.{s}" if s else package) for s in STAGE_LAYER)
        )

    level = {name: i for i, (_, names) in enumerate(layers) for name in names}
    top = {m: m.removeprefix(package + ".").split(".")[0] for m in known if m != package}
    for m in sorted(known):
        if not in_stage_layer(m) and top[m] not in level and m == f"{package}.{top[m]}":
            out.append(
                f"{known[m].relative_to(root.parent)}: {m} is in no layer (add it to "
                "diffmem.tools.layers.LAYERS and docs/architecture.md section 2)"
            )
    packages: dict[str, set[str]] = {}
    for r in refs:
        layer = in_stage_layer(r.source)
        if r.target in stage_mods and not layer:
            out.append(f"{where(r)}: library {r.source} references stage module {r.target}")
        for lib, banned in FORBIDDEN.items():
            if _within(r.source, package, lib) and any(_within(r.target, package, b) for b in banned):
                out.append(f"{where(r)}: {r.source} references {r.target} ({lib} must not use {', '.join(banned)})")
        if not layer and in_stage_layer(r.target) and r.target not in stage_mods and r.target != package:
            out.append(f"{where(r)}: library {r.source} references {r.target} (the stage layer)")
        src, dst = top.get(r.source), top.get(r.target)
        if layer or in_stage_layer(r.target) or src == dst or src not in level or dst not in level:
            continue
        packages.setdefault(src, set()).add(dst)
        if level[dst] > level[src]:
            out.append(
                f"{where(r)}: {r.source} ({layers[level[src]][0]}) references {r.target} "
                f"({layers[level[dst]][0]}, a higher layer)"
            )
    for cycle in _cycles({p: packages.get(p, set()) for p in level}):
        out.append(f"package cycle: {' -> '.join(cycle)}")
    edges: dict[str, set[str]] = {m: set() for m in known}
    for r in refs:
        if r.eager:
            edges[r.source].add(r.target)
    for cycle in _cycles(edges):
        out.append(f"import cycle: {' -> '.join(cycle)}")
    for name in run_files:
        owners = sorted(m for m, p in known.items() if not _within(m, package, "tools") and _literal_in(name, p))
        if len(owners) > 1:
            out.append(f"run-dir file '{name}' is spelled in {len(owners)} modules (one owner): {', '.join(owners)}")
    return out


def _literal_in(name: str, path: Path) -> bool:
    """Whether ``name`` is a string constant in ``path`` (docstrings and comments aside, as a whole)."""
    tree = ast.parse(path.read_text(), str(path))
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value == name for n in ast.walk(tree))


def stage_modules(package: str = "diffmem") -> list[str]:
    """The stage modules registered in ``diffmem.config.STAGES``, relative to the package."""
    from diffmem.config import STAGES

    return sorted(str(t).split(":")[0].removeprefix(f"{package}.") for t in STAGES.targets().values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffmem.tools.layers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the package folder")
    ap.add_argument("--package", default="diffmem", help="its import name")
    args = ap.parse_args(argv)
    violations = check(args.root, args.package, stage_modules())
    for line in violations:
        print(line)
    print(f"{len(violations)} violation(s) of the import rule" if violations else "import rule: ok", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
