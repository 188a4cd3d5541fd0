"""Run the app with uvicorn: in the foreground (``cbir serve``) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from .connections import ConnectionLimits, uvicorn_config


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` serves ``app`` on 127.0.0.1 from a thread until the block ends.

    ``limits``: the connection limits (default: those of :class:`ConnectionLimits`, 1000 connections)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0,
                 limits: ConnectionLimits | None = None) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        limits = limits or ConnectionLimits(max_connections=1000)
        config = uvicorn_config(app, self.host, self.port, limits, log_level="warning", access_log=False, backlog=2048)
        self.server = uvicorn.Server(config)
        self.timeout = timeout
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.timeout)
