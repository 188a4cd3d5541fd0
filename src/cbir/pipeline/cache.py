"""The extraction cache: where descriptors are kept and the key that names them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .benchmark import Benchmark

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$CBIR_CACHE``, else ``$XDG_CACHE_HOME/cbir/descriptors`` (``~/.cache/cbir/descriptors``)."""
    if os.environ.get("CBIR_CACHE"):
        return Path(os.environ["CBIR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cbir" / "descriptors"


def _file_stamp(p: Path) -> list:
    try:
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(p), None, None]


def code_version() -> str:
    """Digest of the package's own source files: a cache entry never outlives a code change."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]  # the cbir package
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(bench: Benchmark, spec: Any, settings: dict[str, Any]) -> str:
    """Hex key of (model identity, extraction settings, image list with sizes/mtimes, crop boxes,
    the code)."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": CACHE_VERSION,
        "code": code_version(),
        "model": spec.identity(),
        "settings": settings,
        "db": [_file_stamp(Path(p)) for p in bench.db_paths],
        "queries": [_file_stamp(Path(p)) for p in bench.query_paths],
        "boxes": [list(b) if b is not None else None for b in bench.query_bboxes] if settings["crop"] else None,
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]
