"""HTTP search service: ``create_app(index)`` (FastAPI) and ``BackgroundServer`` (uvicorn in a thread)."""

from .app import Limits, create_app
from .run import BackgroundServer

__all__ = ["BackgroundServer", "Limits", "create_app"]
