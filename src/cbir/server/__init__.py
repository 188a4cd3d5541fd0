"""HTTP search service: ``create_app(index)`` (FastAPI) and ``BackgroundServer`` (uvicorn in a thread).

The names are loaded on first use, so that ``cbir.server.connections`` (the ``cbir serve`` option
defaults) can be imported without FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .connections import ConnectionLimits
    from .run import BackgroundServer
    from .security import ConfigError, Guard
    from .service import Limits

_HOME = {"create_app": "app", "ConnectionLimits": "connections", "BackgroundServer": "run",
         "ConfigError": "security", "Guard": "security", "Limits": "service"}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
