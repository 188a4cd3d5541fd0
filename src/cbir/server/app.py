"""The search service: a FastAPI app over one index, with a single web page at ``/``.

API (JSON; errors are 4xx with ``{"detail": message}``; schema at /api/openapi.json):

    GET    /api/health                    status, image count, index type, model
    POST   /api/search                    multipart: file (image), bbox "x1,y1,x2,y2" (optional), top
    GET    /api/search/{id}?top=20        more like an indexed image
                                          (both: ``inliers`` of verified results; matches=true: their
                                          inlier correspondences, for drawing why they matched)
    POST   /api/images                    multipart: file -> added to the index (write: token, same origin)
    DELETE /api/images/{id}               removed from the index (write: token, same origin)
    GET    /api/images/{id}               metadata of an indexed image
    GET    /api/thumb/{id}?size=256       JPEG thumbnail of an indexed image

Safety: request bodies over ``Limits.max_request_bytes`` are refused (413) from the
Content-Length header or while streaming; the Host header must be an allowed name (400,
``security.HostCheck``); writes are guarded (``routes.write_access``). Images are served by id
only, from the paths recorded in the index's database: no request names a file, so none can
reach outside the index. Slow clients (header and body timeouts) and the number of connections
are the server's business: ``cbir.server.connections``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, Response

from ..index import Index
from .routes import router
from .security import Guard, HostCheck
from .service import Limits, Service

STATIC = Path(__file__).parent / "static"


class RequestTooLarge(HTTPException):
    """Raised from the body stream; an HTTPException so FastAPI's body parsing passes it on as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes (by Content-Length, or counted while streaming)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = True
            if too_big:
                return await _send_json(send, 413, f"request body too large (limit {self.limit} bytes)")
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestTooLarge(self.limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except RequestTooLarge:
            if not started:
                await _send_json(send, 413, f"request body too large (limit {self.limit} bytes)")


async def _send_json(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(index: Index | str | os.PathLike[str], *, index_path: str | os.PathLike[str] | None = None,
               limits: Limits | None = None, read_only: bool = False, device: str = "auto",
               encoder: Any = None, guard: Guard | None = None, rerank: Any = None) -> FastAPI:
    """The app for an index (an open ``Index`` + where to save it, or the index folder).

    ``rerank``: a :class:`cbir.rerank.Rerank` or :class:`cbir.rerank.recipe.Recipe` applied
    to every search (exact, over all stored vectors); None: the index's own search. With its
    ``verify`` set, searches verify their top K against the index's local features (INDEX/local:
    ValueError when there are none).

    ``guard``: allowed Host names and write token (default: loopback names, no token).
    """
    if not isinstance(index, Index):
        index_path = index
        index = Index.load(index, device=device)
    if index_path is None and not read_only:
        raise ValueError("create_app needs index_path to save additions (or read_only=True)")
    svc = Service(index=index, index_path=Path(index_path) if index_path else Path("."), limits=limits or Limits(),
                  read_only=read_only, device=device, encoder=encoder, guard=guard or Guard(), rerank=rerank)
    app = FastAPI(title="cbir search", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.service = svc
    app.add_middleware(BodyLimit, limit=svc.limits.max_request_bytes)
    app.add_middleware(HostCheck, guard=svc.guard)  # added last: runs first
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    @app.get("/favicon.svg", include_in_schema=False)
    def favicon() -> Response:
        return Response((STATIC / "favicon.svg").read_bytes(), media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})

    return app
