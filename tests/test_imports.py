"""No import cycles: lowvram's modules import one another in one direction (read from the source with ast)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import lowvram

ROOT = Path(lowvram.__file__).parent
# The panel: the repository's top-level webui/, installed as lowvram.webui (pyproject's package-dir).
WEBUI = Path(importlib.util.find_spec("lowvram.webui").origin).parent


def modules(package: Path, dotted: str | None = None) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package ``__init__``) for every ``.py`` under ``package``, which imports as
    ``dotted`` (default: the folder's name)."""
    out = {}
    for path in package.rglob("*.py"):
        parts = [*(dotted or package.name).split("."), *path.relative_to(package).with_suffix("").parts]
        is_init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def imports_of(name: str, path: Path, is_init: bool, known: set[str], lazy: bool) -> set[str]:
    """The modules of ``known`` that ``name`` imports: at import time only, or (``lazy``) inside functions too.
    ``if TYPE_CHECKING:`` blocks never run, so they do not count."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking(node):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not lazy:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".") if is_init else name.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # ``from pkg import sub`` imports the module pkg.sub; ``from mod import name`` imports mod
                found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit([n for n in getattr(node, field, []) if isinstance(n, ast.stmt | ast.ExceptHandler)])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in found if m in known and m != name}


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the installed package: lowvram/ and the panel (webui/ as lowvram.webui)."""
    return {**modules(ROOT), **modules(WEBUI, "lowvram.webui")}


def import_graph(package: Path | dict[str, tuple[Path, bool]], lazy: bool = False) -> dict[str, set[str]]:
    mods = package if isinstance(package, dict) else modules(package)
    return {name: imports_of(name, path, is_init, set(mods), lazy) for name, (path, is_init) in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a → … → a) through each group of modules that import one another, found by depth-first search."""
    done: set[str] = set()
    found = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                walk(nxt, path + [nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            walk(start, [start])
    return found


def test_no_import_cycle_at_import_time():
    graph = import_graph(package_modules())
    assert len(graph) > 50 and graph["lowvram.train.run"]  # the walk read the package, imports and all
    assert "lowvram.errors" in graph["lowvram.webui.jobs"]  # and the panel, its relative imports resolved
    assert cycles(graph) == []


def test_the_walk_finds_a_cycle_and_ignores_what_never_runs_at_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("try:\n    from ..a import x\nexcept ImportError:\n    pass\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b", "pkg.a"]]
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import x\n"
                                      "def f():\n    from pkg.a import x\n")
    assert cycles(import_graph(pkg)) == []
    assert cycles(import_graph(pkg, lazy=True)) == [["pkg.a", "pkg.sub.b", "pkg.a"]]


def test_trainer_and_exporter_share_the_run_folder_layout_not_each_other():
    """The cycle train.run → finetune → export → train.run carried a file name and a config loader."""
    graph = import_graph(package_modules(), lazy=True)  # function-level imports count here
    assert "lowvram.train.run" not in graph["lowvram.export"]
    job = graph["lowvram.train.finetune"] | graph["lowvram.families.flux"] | graph["lowvram.families.sd"]
    assert "lowvram.export" not in job
    assert "lowvram.train.run" not in job
    assert graph["lowvram.run_folder"] <= {"lowvram.config", "lowvram.errors"}
    assert "lowvram.run_folder" in graph["lowvram.export"] & graph["lowvram.train.run"]
