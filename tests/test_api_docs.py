"""The API reference (docs/api/build_reference.py, ``make docs``) builds, and its checker fails on a
broken reference: a name of ``__all__`` that does not import, an undocumented name, a
cross-reference that does not resolve, a guide naming something that is not exported."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_reference", ROOT / "docs" / "api" / "build_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_reference_of_cbir_builds_without_problems(tmp_path):
    b = _builder()
    problems = b.build(tmp_path / "api")
    assert problems == []
    html = (tmp_path / "api" / "cbir.html").read_text()
    import cbir

    for name in cbir.__all__:  # every public name has its entry (a module: its own page)
        assert f'id="{name}"' in html or (tmp_path / "api" / "cbir" / f"{name}.html").is_file(), name
    assert "holidays805-lite0" in html  # the package docstring's example is on the page


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """A package ``fakeapi`` written to order; removed from sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(init: str, impl: str) -> str:
        pkg = tmp_path / "fakeapi"
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text(textwrap.dedent(init))
        (pkg / "impl.py").write_text(textwrap.dedent(impl))
        for m in [m for m in sys.modules if m == "fakeapi" or m.startswith("fakeapi.")]:
            del sys.modules[m]
        importlib.invalidate_caches()
        return "fakeapi"

    yield write
    for m in [m for m in sys.modules if m == "fakeapi" or m.startswith("fakeapi.")]:
        del sys.modules[m]


IMPL = '''
    """Implementation."""


    class Thing:
        """A thing; see :meth:`grow` and :func:`fakeapi.impl.helper`."""

        def grow(self) -> None:
            """Grow (like :meth:`Thing.grow`, and :class:`Thing`)."""


    def helper() -> int:
        """Help; returns :class:`Thing` counts, calls ``fakeapi.impl.Thing.grow``."""
        return 1
'''


def test_a_clean_package_passes(fake_package):
    b = _builder()
    name = fake_package('''
        """Fake: `Thing`, `helper`."""
        from .impl import Thing, helper
        __all__ = ["Thing", "helper"]
    ''', IMPL)
    assert b.check(name) == []


@pytest.mark.filterwarnings("ignore:Found 'missing' in fakeapi.__all__")  # pdoc's own warning for that case
@pytest.mark.parametrize("init,impl,expect", [
    # a cross-reference to a function that does not exist
    ('"""Fake."""\nfrom .impl import helper\n__all__ = ["helper"]\n',
     IMPL.replace(":class:`Thing` counts", ":func:`no_such_function` counts"), ":func:`no_such_function`"),
    # a method's reference to another method that is not there
    ('"""Fake."""\nfrom .impl import Thing\n__all__ = ["Thing"]\n',
     IMPL.replace(":meth:`Thing.grow`", ":meth:`Thing.shrink`"), ":meth:`Thing.shrink`"),
    # a backticked dotted name that does not resolve
    ('"""Fake."""\nfrom .impl import helper\n__all__ = ["helper"]\n',
     IMPL.replace("``fakeapi.impl.Thing.grow``", "``fakeapi.impl.Thing.gone``"), "fakeapi.impl.Thing.gone"),
    # a name in __all__ that is not there
    ('"""Fake."""\nfrom .impl import helper\n__all__ = ["helper", "missing"]\n', IMPL, "fakeapi.missing: does not import"),
    # an exported name without a docstring
    ('"""Fake."""\nfrom .impl import helper\ndef bare() -> None:\n    pass\n__all__ = ["bare", "helper"]\n', IMPL,
     "fakeapi.bare: has no docstring"),
    # the package guide names something it does not export
    ('"""Fake: `helper`, `Thing`."""\nfrom .impl import helper\n__all__ = ["helper"]\n', IMPL,
     "`Thing` is not a name of fakeapi.__all__"),
])
def test_a_broken_reference_is_reported(fake_package, init, impl, expect):
    b = _builder()
    name = fake_package(init, impl)
    problems = b.check(name)
    assert len(problems) == 1 and expect in problems[0], problems


def test_the_build_script_exits_1_on_problems(monkeypatch, tmp_path):
    b = _builder()
    monkeypatch.setattr(b, "build", lambda out: ["cbir.x: has no docstring"])
    assert b.main(["--out", str(tmp_path)]) == 1
    monkeypatch.setattr(b, "build", lambda out: [])
    assert b.main(["--out", str(tmp_path)]) == 0
