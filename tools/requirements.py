"""Write requirements.txt and requirements-dev.txt from pyproject.toml (``make requirements``).

requirements.txt: ``[project] dependencies``; requirements-dev.txt: ``-r requirements.txt`` then every
extra that ``dev`` names (``cbir[...]``) and dev's own tools. Each line is the dependency as pyproject
says it, with ``==VERSION`` instead of its range where ``[tool.cbir.pins]`` pins the name. Run with
``--check`` to exit 1 when the files on disk differ (tests/test_packaging.py does the same).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = "# GENERATED from pyproject.toml by `make requirements` (tools/requirements.py): do not edit.\n"


def dist_name(requirement: str) -> str:
    """The normalised distribution name of a requirement line (PEP 503: lower case, runs of -_. -> -)."""
    name = re.split(r"[\[<>=!~ ;]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _line(requirement: str, pins: dict[str, str]) -> str:
    req = requirement.strip()
    pin = pins.get(dist_name(req))
    if pin is None:
        return req
    m = re.match(r"^([A-Za-z0-9_.\-]+(\[[^\]]*\])?)", req)
    return f"{m.group(1)}=={pin}"


def render(pyproject: dict) -> dict[str, str]:
    """{file name: text} of the two requirement files."""
    project = pyproject["project"]
    pins = {dist_name(k): v for k, v in pyproject.get("tool", {}).get("cbir", {}).get("pins", {}).items()}
    extras = project["optional-dependencies"]
    base = HEADER + "".join(_line(r, pins) + "\n" for r in project["dependencies"])
    dev = HEADER + "-r requirements.txt\n"
    tools = []
    for req in extras["dev"]:
        m = re.match(r"^cbir\[([^\]]*)\]$", req.strip())
        if m:
            for extra in (e.strip() for e in m.group(1).split(",")):
                dev += f"# extra {extra}\n" + "".join(_line(r, pins) + "\n" for r in extras[extra])
        else:
            tools.append(req)
    dev += "# extra dev\n" + "".join(_line(r, pins) + "\n" for r in tools)
    return {"requirements.txt": base, "requirements-dev.txt": dev}


def main(argv: list[str]) -> int:
    files = render(tomllib.loads((REPO / "pyproject.toml").read_text()))
    if "--check" in argv:
        stale = [n for n, text in files.items() if not (REPO / n).is_file() or (REPO / n).read_text() != text]
        if stale:
            print(f"out of date with pyproject.toml: {', '.join(stale)} (run `make requirements`)", file=sys.stderr)
            return 1
        return 0
    for name, text in files.items():
        (REPO / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
