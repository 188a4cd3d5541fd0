"""HTTP search service: ``create_app(index)`` (FastAPI) and ``BackgroundServer`` (uvicorn in a thread)."""

from .app import create_app
from .run import BackgroundServer
from .security import ConfigError, Guard
from .service import Limits

__all__ = ["BackgroundServer", "ConfigError", "Guard", "Limits", "create_app"]
