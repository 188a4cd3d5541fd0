"""The package is real: its metadata declares what it needs, and a wheel installs and runs.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation --no-index``, setuptools from
this environment), installed with ``--no-deps`` into an empty virtual environment, and run with the
third-party packages of this environment on PYTHONPATH (they are not the package's to install here;
``dependencies`` is checked against requirements.txt instead).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _names(lines) -> set[str]:
    out = set()
    for line in lines:
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        out.add(re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ]", line, maxsplit=1)[0]).lower())
    return out


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_requirements", REPO / "tools" / "requirements.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_requirement_files_are_generated_from_pyproject():
    """requirements.txt / requirements-dev.txt are exactly what tools/requirements.py makes of pyproject
    (its dependencies, every extra dev names and dev's tools, pinned by [tool.cbir.pins])."""
    gen = _generator()
    for name, text in gen.render(_pyproject()).items():
        assert (REPO / name).read_text() == text, f"{name} is out of date: run `make requirements`"
    project = _pyproject()["project"]
    base = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    assert _names((REPO / "requirements.txt").read_text().splitlines()) == base  # extras are not base packages
    dev = _names((REPO / "requirements-dev.txt").read_text().splitlines())
    assert set().union(*(v for k, v in extras.items() if k != "dev")) <= dev  # every extra's tests can run
    assert {"ray", "matplotlib", "tensorboard", "fastapi"}.isdisjoint(base)
    assert {"schemathesis", "pytest", "hypothesis"} <= extras["dev"]
    for core in ("torch", "torchvision", "timm", "faiss-cpu", "numpy", "scipy", "pillow", "filelock", "pydantic"):
        assert core in base
    for extra, needs in {"serve": {"fastapi", "uvicorn"}, "train": {"tensorboard"}, "ray": {"ray"}}.items():
        assert needs <= extras[extra]


def test_generator_pins_and_keeps_extras_apart():
    """On a made-up pyproject: a pin replaces the range (extras in brackets kept), the rest is verbatim."""
    gen = _generator()
    files = gen.render({"project": {"dependencies": ["Foo_Bar>=1", "baz"],
                                    "optional-dependencies": {"x": ["ray[data]>=2"], "dev": ["cbir[x]", "pytest"]}},
                        "tool": {"cbir": {"pins": {"foo-bar": "1.2", "ray": "2.5"}}}})
    assert files["requirements.txt"].splitlines()[1:] == ["Foo_Bar==1.2", "baz"]
    assert files["requirements-dev.txt"].splitlines()[1:] == ["-r requirements.txt", "# extra x", "ray[data]==2.5",
                                                               "# extra dev", "pytest"]


def test_pins_satisfy_their_ranges():
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = _pyproject()
    pins = project["tool"]["cbir"]["pins"]
    reqs = {}
    for r in [*project["project"]["dependencies"], *sum(project["project"]["optional-dependencies"].values(), [])]:
        if not r.startswith("cbir["):
            req = Requirement(r)
            reqs[req.name.lower().replace("_", "-")] = req
    for name, version in pins.items():
        assert name in reqs, f"[tool.cbir.pins] pins {name}, which no dependency or extra declares"
        assert Version(version) in reqs[name].specifier, f"pin {name}=={version} outside {reqs[name].specifier}"


def _third_party_imports() -> dict[str, set[str]]:
    """{top-level module: files} of every absolute import in src/cbir that is not the standard library."""
    import ast

    out: dict[str, set[str]] = {}
    for path in (REPO / "src" / "cbir").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("cbir", "__future__"):
                    out.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return out


def test_every_imported_package_is_declared():
    """Each third-party module src/ imports belongs to a distribution that pyproject declares (a
    dependency or an extra): nothing works only because another package happened to bring it."""
    from importlib.metadata import packages_distributions

    project = _pyproject()["project"]
    declared = _names(project["dependencies"]) | set().union(
        *(_names(v) for v in project["optional-dependencies"].values()))
    owners = packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "numpy", "fastapi", "huggingface_hub", "h11", "pydantic_core"} <= set(imports)  # the scan sees them
    undeclared = {}
    for module, files in sorted(imports.items()):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(module, [])}
        assert dists, f"{module} (imported in {sorted(files)[0]}) is not installed here"
        if dists.isdisjoint(declared):
            undeclared[module] = (sorted(dists), sorted(files)[0])
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"


@pytest.mark.slow
def test_wheel_installs_into_an_empty_venv_and_runs(tmp_path):
    import shutil

    src = tmp_path / "src-copy"  # built from a copy: setuptools writes build files beside the sources
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no source tree shadowing the wheel
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(wheels), str(src)], capture_output=True, text=True, cwd=tmp_path, env=clean)
    if build.returncode != 0 and "setuptools" in build.stderr.lower() and "no module" in build.stderr.lower():
        pytest.skip("setuptools is not installed here: the wheel cannot be built offline")
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("cbir-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    requires = _names(line.split(":", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist:"))
    assert {"torch", "timm", "faiss-cpu", "fastapi", "pydantic"} <= requires
    assert any(n.startswith("cbir/data/demo/jpg/") for n in names)  # the demo photos ship with it
    assert "cbir/server/static/index.html" in names or any(n.startswith("cbir/server/static/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index",
                           "--no-deps", str(wheel)], capture_output=True, text=True, env=clean)
    assert inst.returncode == 0, inst.stderr[-2000:]
    env = dict(clean, PYTHONPATH=sysconfig.get_paths()["purelib"])  # third-party packages only
    env.pop("CBIR_SHARED", None)
    out = subprocess.run([str(venv / "bin" / "cbir"), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "evaluate" in out.stdout, out.stderr[-2000:]
    out = subprocess.run([str(py), "-c", "import cbir, cbir.pipeline; print(cbir.__file__); print(cbir.__version__)"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    where, ver = out.stdout.split()
    assert str(venv) in where and ver == _pyproject()["project"]["version"]
