"""The python examples of README.md and docs/*.md run, as written.

Every fenced block whose info string is exactly ``python`` runs; the blocks of one file run in
order in one namespace (a later block may use an earlier one's names), in a fresh working folder,
offline, on the bundled demo set. ``HOME`` and ``CBIR_CACHE`` point into a folder shared by this
module's tests, so the descriptor cache the examples fill (``~/.cache/cbir/...``,
``cbir.default_cache_dir()``) is shared by them and never the user's. A block that cannot run here
(it needs data or a machine we do not have) is marked ``python no-run`` and counted in ``NO_RUN``:
a new one must be added there, with its reason.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)

#: blocks marked ``python no-run``, per file, and why
NO_RUN = {
    "docs/mining.md": (1, "verified_pairs on the caller's photos: ~80 s of SIFT + RANSAC even on the 38 demo photos"),
    "docs/adapt.md": (1, "adapt mines the caller's photos (SIFT + RANSAC): minutes even on the demo; tests/test_adapt.py runs it small"),
}


def python_blocks(text: str) -> list[tuple[str, str, int]]:
    """(info string, code, line number) of every fenced block whose language is python."""
    out = []
    for m in FENCE.finditer(text):
        info = m.group(1).strip()
        if info.split()[:1] == ["python"]:
            out.append((info, m.group(2), text.count("\n", 0, m.start()) + 2))
    return out


def test_the_block_reader_finds_python_blocks_and_marks():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python no-run\nbig()\n```\n```\nplain\n```\n"
    assert python_blocks(text) == [("python", "a = 1\n", 3), ("python no-run", "big()\n", 9)]


RUNNABLE = [p for p in DOCS if any(info == "python" for info, _, _ in python_blocks(p.read_text()))]


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    return tmp_path_factory.mktemp("docs-home")


def test_no_run_blocks_are_counted():
    found = {}
    for p in DOCS:
        for info, _, line in python_blocks(p.read_text()):
            if info != "python":
                assert info == "python no-run", f"{p.name}:{line}: unknown mark {info!r} (python or python no-run)"
                found[p.relative_to(ROOT).as_posix()] = found.get(p.relative_to(ROOT).as_posix(), 0) + 1
    assert found == {k: n for k, (n, _) in NO_RUN.items()}, "python no-run blocks changed: update NO_RUN (and why)"


def test_the_readme_and_the_api_page_have_examples_that_run():
    names = {p.relative_to(ROOT).as_posix() for p in RUNNABLE}
    assert {"README.md", "docs/api.md", "docs/evaluation.md", "docs/search.md", "docs/scale.md"} <= names


@pytest.mark.parametrize("doc", RUNNABLE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_examples_run(doc, shared_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(shared_home))
    monkeypatch.setenv("CBIR_CACHE", str(shared_home / "cache"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for info, code, line in python_blocks(doc.read_text()):
        if info != "python":
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{doc.name}:{line}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"{doc.relative_to(ROOT)}, block at line {line}: {type(exc).__name__}: {exc}")
