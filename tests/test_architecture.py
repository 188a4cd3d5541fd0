"""The import graph of the package: no cycles inside ``cbir``, and no library module importing the CLI.

Imports are read with ``ast`` from every module's source, function-level imports included (a cycle
hidden inside a function is still a cycle of the design). ``import cbir.a.b`` and ``from .a import b``
both count as edges to ``cbir.a.b`` when that is a module, else to ``cbir.a``. Edges to a package's
``__init__`` are left out when the importer is inside that package (importing a sibling through the
package is how Python resolves ``from . import x``). Imports under ``if TYPE_CHECKING:`` are for
annotations only and never run, so they are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "cbir"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py") if "data" not in p.relative_to(PKG).parts[:1]}


def _resolve(target: str, known: dict[str, Path]) -> str | None:
    """The longest known module name that ``target`` starts with."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in known:
            return name
        parts.pop()
    return None


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports for annotations only, never run."""
    if not isinstance(node, ast.If):
        return False
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """module -> the cbir modules it imports (anywhere in its body)."""
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        type_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                     for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import name`: name may be a submodule
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            for t in targets:
                if not t.startswith("cbir"):
                    continue
                dst = _resolve(t, known)
                if dst is None or dst == mod:
                    continue
                if known[dst].name == "__init__.py" and (mod + ".").startswith(dst + "."):
                    continue  # a module importing its own package's __init__ (sibling access)
                graph[mod].add(dst)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    # cli/evaluate.py imports the pipeline inside its handler only
    assert "cbir.pipeline" in graph["cbir.cli.evaluate"]
    assert "cbir.fileio" in graph["cbir.descriptors"]


def test_no_import_cycles_inside_cbir():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_library_never_imports_the_cli():
    graph = import_graph()
    cli = ("cbir.cli", "cbir.__main__")  # `python -m cbir` is the command line too
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if not m.startswith(cli)
                 for d in deps if d == "cbir.cli" or d.startswith("cbir.cli."))
    assert bad == [], "library modules importing the CLI: " + ", ".join(bad)


def argparse_imports(root: Path = PKG) -> list[str]:
    """Modules outside ``cbir.cli`` / ``cbir.__main__`` that import argparse (anywhere in their body,
    ``from argparse import ...`` included; imports for annotations only, under TYPE_CHECKING, too:
    a library signature should not take an argparse.Namespace)."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if rel.parts[1:2] in (("cli",), ("__main__.py",)) or "data" in rel.parts[1:2]:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "argparse" or n.startswith("argparse.") for n in names):
                bad.append(f"{rel}:{node.lineno}")
    return bad


def test_the_argparse_checker_finds_imports(tmp_path):
    pkg = tmp_path / "cbir"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "cli" / "ok.py").write_text("import argparse\n")
    (pkg / "__main__.py").write_text("import argparse\n")
    (pkg / "lib.py").write_text("def f():\n    from argparse import Namespace\n")
    (pkg / "other.py").write_text("import os, argparse as ap\n")
    (pkg / "clean.py").write_text("import json  # argparse in a comment\nx = 'import argparse'\n")
    assert argparse_imports(pkg) == ["cbir/lib.py:2", "cbir/other.py:1"]


def test_argparse_only_in_the_cli():
    bad = argparse_imports()
    assert bad == [], "argparse imported outside cbir/cli (the library takes typed objects): " + ", ".join(bad)
