"""Build the API reference of ``import cbir`` from the docstrings (pdoc), and fail on a broken one.

    python docs/api/build_reference.py [--out build/api]      (``make docs``; run by tests/test_api_docs.py)

The reference is the page of the ``cbir`` package: every name of ``cbir.__all__`` with its
signature and docstring (classes with their public methods), rendered by pdoc into ``OUT/cbir.html``
(``build/`` is git-ignored). pdoc renders what it is given without complaint, so this script
checks what it documents and exits 1, one line per problem, when:

- a name of ``cbir.__all__`` does not import, is missing from the page, or has no docstring;
- a cross-reference in a documented docstring does not resolve: a Sphinx role (``:func:`x```,
  ``:class:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:``, ``:exc:``, ``:obj:``), or a
  backticked dotted name that starts with ``cbir.`` (``cbir.pipeline.describe``);
- the ``cbir`` package docstring names (in single backticks) something that is not in ``cbir.__all__``.

A role's target is looked up as Python would: an absolute dotted name (the longest importable
module, then attributes), else relative to the class of the method, the module that defines the
object, and the ``cbir`` package.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

ROLE = re.compile(r"(?::py)?:(?:mod|func|data|const|class|meth|attr|exc|obj):`([^`]+)`")


def dotted(package: str) -> re.Pattern[str]:
    """A backticked dotted name starting with ``package.`` (single or double backticks), nothing
    else inside the backticks (``cbir.extract(net, paths)`` is code, not a reference)."""
    return re.compile(r"(?<![`\w])``?(" + re.escape(package) + r"(?:\.[A-Za-z_]\w*)+)``?(?![\w(])")


BARE = re.compile(r"(?<![`:\w])`([A-Za-z_]\w*)`(?![`\w])")


def _import_longest(name: str) -> Any:
    """The object of an absolute dotted name: the longest importable module prefix, then getattr."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return _MISSING
        return obj
    return _MISSING


_MISSING = object()


def _getattr_chain(base: Any, name: str) -> Any:
    obj = base
    for attr in name.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            return _MISSING
    return obj


def resolve(target: str, owner_module: ModuleType | None, owner_class: type | None = None) -> bool:
    """Whether a reference ``target`` (``~`` / ``!`` / ``.`` prefixes and ``()`` allowed) names an object."""
    t = target.strip().lstrip("~!.").removesuffix("()")
    if "<" in t:  # :func:`title <target>`
        t = t.split("<", 1)[1].rstrip(">").strip()
    if not re.fullmatch(r"[A-Za-z_][\w.]*", t):
        return False
    scopes: list[Any] = [owner_class, owner_module, importlib.import_module("cbir")]
    for scope in scopes:
        if scope is not None and _getattr_chain(scope, t) is not _MISSING:
            return True
    return _import_longest(t) is not _MISSING


def _documented(obj: Any) -> Iterator[tuple[str, Any, type | None]]:
    """(qualified label, object, class it belongs to) for an API object and its public members (a
    module: the names of its ``__all__``, as its own reference page shows them)."""
    if isinstance(obj, ModuleType):
        yield obj.__name__, obj, None
        for name in getattr(obj, "__all__", []):
            member = getattr(obj, name, None)
            if inspect.isclass(member) or inspect.isfunction(member):
                yield from _documented(member)
        return
    yield getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj))), obj, obj if inspect.isclass(obj) else None
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            member = getattr(member, "__func__", member)  # classmethod / staticmethod
            if isinstance(member, property):
                member = member.fget
            if inspect.isfunction(member):
                yield f"{obj.__qualname__}.{name}", member, obj


def own_doc(obj: Any) -> str:
    """The docstring ``obj`` itself carries (not one inherited from a base class), cleaned."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def check(package: str = "cbir", pages: set[str] | None = None) -> list[str]:
    """Problems of the API reference of ``package`` (empty: none); see the module docstring.
    ``pages``: the modules pdoc rendered (an API name that is a module needs its own page)."""
    import pdoc.doc

    pkg = importlib.import_module(package)
    DOTTED = dotted(package)
    problems: list[str] = []
    page = pdoc.doc.Module(pkg)
    on_page = set(page.members)
    for name in pkg.__all__:
        try:
            obj = getattr(pkg, name)
        except Exception as exc:  # an API name that does not import is the broken reference itself
            problems.append(f"{package}.{name}: does not import ({type(exc).__name__}: {exc})")
            continue
        if isinstance(obj, ModuleType):
            if pages is not None and obj.__name__ not in pages:
                problems.append(f"{package}.{name}: a module in __all__ without its reference page")
        elif name not in on_page:
            problems.append(f"{package}.{name}: in __all__ but missing from the reference page")
        if not own_doc(obj):
            problems.append(f"{package}.{name}: has no docstring")
        owner = inspect.getmodule(obj) if not isinstance(obj, ModuleType) else obj
        for label, member, cls in _documented(obj):
            doc = own_doc(member)
            where = owner if not isinstance(obj, ModuleType) else obj
            mod = inspect.getmodule(member) or where
            for m in ROLE.finditer(doc):
                if not resolve(m.group(1), mod, cls):
                    problems.append(f"{package}.{name} ({label}): reference {m.group(0)} does not resolve")
            for m in DOTTED.finditer(doc):
                if not resolve(m.group(1), mod, cls):
                    problems.append(f"{package}.{name} ({label}): reference `{m.group(1)}` does not resolve")
    own = own_doc(pkg)
    for m in DOTTED.finditer(own):
        if not resolve(m.group(1), pkg):
            problems.append(f"{package} docstring: reference `{m.group(1)}` does not resolve")
    for m in ROLE.finditer(own):
        if not resolve(m.group(1), pkg):
            problems.append(f"{package} docstring: reference {m.group(0)} does not resolve")
    listed = set(pkg.__all__)
    for m in BARE.finditer(own):
        if m.group(1) not in listed:
            problems.append(f"{package} docstring: `{m.group(1)}` is not a name of {package}.__all__")
    return problems


def build(out: Path, package: str = "cbir") -> list[str]:
    """Render the reference of ``package`` into ``out`` (HTML) and return its problems (:func:`check`)."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="restructuredtext", show_source=False, search=False)
    out.mkdir(parents=True, exist_ok=True)
    pkg = importlib.import_module(package)
    modules = [f"{package}.{n}" for n in pkg.__all__ if isinstance(getattr(pkg, n, None), ModuleType)]
    specs = [package, "!" + re.escape(package + "."), *modules]
    pdoc.pdoc(*specs, output_directory=out)
    pages = {p.relative_to(out).with_suffix("").as_posix().replace("/", ".") for p in out.rglob("*.html")}
    problems = check(package, pages)
    if not (out / f"{package}.html").is_file():
        problems.append(f"{out / (package + '.html')}: not written")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/api"), help="output folder (default: build/api)")
    args = ap.parse_args(argv)
    problems = build(args.out)
    for p in problems:
        print(f"api reference: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"api reference: {args.out / 'cbir.html'} ({len(importlib.import_module('cbir').__all__)} names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
