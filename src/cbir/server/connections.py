"""Connection limits of the HTTP server: slow clients are dropped, the number of connections is capped.

:class:`ConnectionLimits` holds them; :func:`uvicorn_config` makes the ``uvicorn.Config`` that
applies them: uvicorn's own settings where it has one (``timeout_keep_alive``,
``limit_concurrency``, ``h11_max_incomplete_event_size``, ``timeout_graceful_shutdown``) and, for
the header and body timeouts that uvicorn lacks, the h11 protocol of :mod:`cbir.server.protocol`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take and how many may be connected (seconds, counts, bytes)."""

    header_timeout: float = 10.0       # request line + headers, from the connection opening (or the first byte of a
    #                                    later request on a kept-alive connection)
    body_timeout: float = 60.0         # the whole request body, from the end of the headers
    keep_alive: float = 5.0            # idle time allowed between two requests on one connection
    max_connections: int = 100         # connections served at once; a request beyond them gets 503
    max_header_bytes: int = 16 * 1024  # request line + headers (larger: 400)
    shutdown_timeout: float = 10.0     # on stop, running requests get this long before they are cancelled

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise LimitError(f.name, f"must be a positive finite number, got {value!r}")
            if f.name in ("max_connections", "max_header_bytes") and int(value) != value:
                raise LimitError(f.name, f"must be a whole number, got {value!r}")


class LimitError(ValueError):
    """A bad :class:`ConnectionLimits` value; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"connection limit {field} {problem}")
        self.field, self.problem = field, problem


def uvicorn_config(app: Any, host: str, port: int, limits: ConnectionLimits | None = None, **kw: Any):
    """A ``uvicorn.Config`` serving ``app`` with ``limits`` (default :class:`ConnectionLimits`); ``kw`` go to uvicorn.

    uvicorn answers 503 to a request that arrives while ``limit_concurrency`` or more connections
    are open, so it is given ``max_connections + 1``: ``max_connections`` connections are served.
    """
    import uvicorn

    from .protocol import timed_h11_protocol

    limits = limits or ConnectionLimits()
    return uvicorn.Config(app, host=host, port=port, http=timed_h11_protocol(limits.header_timeout, limits.body_timeout),
                          timeout_keep_alive=limits.keep_alive, limit_concurrency=int(limits.max_connections) + 1,
                          h11_max_incomplete_event_size=int(limits.max_header_bytes),
                          timeout_graceful_shutdown=limits.shutdown_timeout, **kw)
