"""Where cbir keeps what it can make again: one function, :func:`cache_dir`, for every cache folder.

Each kind of cached file has a folder, overridable by an environment variable; without it the folder
is under ``$XDG_CACHE_HOME/cbir`` (``~/.cache/cbir`` when XDG_CACHE_HOME is unset or empty):

============== ======================== ===================================================================
kind           variable                 default                        what
============== ======================== ===================================================================
descriptors    ``CBIR_CACHE``           ``$XDG_CACHE_HOME/cbir/descriptors``   the extraction cache (:mod:`cbir.cache`: ``vectors-vN/``,
                                                                               ``digests.sqlite``), local features (``local-vN/``)
query-models   (inside descriptors)     ``<descriptors>/query-models``  exported query networks of read-only indexes, optimised graphs
converted      ``CBIR_CONVERTED_CACHE`` ``$XDG_CACHE_HOME/cbir/converted``     networks converted for ONNX Runtime / OpenVINO
models         ``CBIR_MODELS``          ``$XDG_CACHE_HOME/cbir/models``        downloaded published networks (:mod:`cbir.published`)
============== ======================== ===================================================================

The kinds inside the descriptor cache move with ``CBIR_CACHE`` (so one variable puts a test's or a
job's cache in one place, and ``cbir cache clear`` sees them). Deleting any of these folders is safe:
its content is made again when needed. Nothing else in cbir computes a cache path.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_KINDS", "cache_root", "cache_dir"]

#: kind -> (environment variable overriding it or None, the kind it lives inside or None, folder name)
CACHE_KINDS: dict[str, tuple[str | None, str | None, str]] = {
    "descriptors": ("CBIR_CACHE", None, "descriptors"),
    "query-models": (None, "descriptors", "query-models"),
    "converted": ("CBIR_CONVERTED_CACHE", None, "converted"),
    "models": ("CBIR_MODELS", None, "models"),
}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/cbir``, or ``~/.cache/cbir`` when XDG_CACHE_HOME is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cbir"


def cache_dir(kind: str = "descriptors") -> Path:
    """The folder of cached ``kind`` (see the table above); not created here. ValueError for an unknown kind."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; known: {', '.join(CACHE_KINDS)}")
    env, parent, name = CACHE_KINDS[kind]
    if env and os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    return (cache_dir(parent) if parent else cache_root()) / name
