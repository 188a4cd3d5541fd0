"""The search service: a FastAPI app over one index, with a single web page at ``/``.

API (JSON; errors are 4xx with ``{"detail": message}``):

    GET  /api/health                      status, image count, index type, model
    POST /api/search                      multipart: file (image), bbox "x1,y1,x2,y2" (optional), top
    GET  /api/search/{id}?top=20          more like an indexed image
    POST /api/images                      multipart: file -> added to the index (saved atomically)
    GET  /api/images/{id}                 metadata of an indexed image
    GET  /api/thumb/{id}?size=256         JPEG thumbnail of an indexed image

Safety: request bodies over ``Limits.max_request_bytes`` are refused (413) from the
Content-Length header or while streaming; uploads must have an image content type and decode
as one of the allowed formats (415), and their pixel count is checked from the header before
decoding (413: decompression bombs). Images are served by id only, from the paths recorded in the
index's database: no request names a file, so none can reach outside the index.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image, ImageOps, UnidentifiedImageError

from ..index import Index, IncompatibleDescriptorError

STATIC = Path(__file__).parent / "static"

CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/bmp": "BMP",
                 "image/gif": "GIF", "image/tiff": "TIFF"}
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 20 * 1024 * 1024   # whole request body
    max_pixels: int = 40_000_000                # width x height of an uploaded image
    max_top: int = 500                          # results per search
    thumb_sizes: tuple[int, int] = (32, 1024)   # allowed thumbnail sizes
    thumb_cache: int = 512                      # thumbnails kept in memory


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


@dataclass
class Service:
    """Everything the app shares between requests: the index, the query encoder (loaded once), caches."""

    index: Index
    index_path: Path
    limits: Limits = field(default_factory=Limits)
    read_only: bool = False
    device: str = "auto"
    encoder: Any = None
    _encoder_lock: threading.Lock = field(default_factory=threading.Lock)
    _save_lock: threading.Lock = field(default_factory=threading.Lock)
    _thumbs: "OrderedDict[tuple[int, int], bytes]" = field(default_factory=OrderedDict)
    _thumb_lock: threading.Lock = field(default_factory=threading.Lock)

    def get_encoder(self):
        """The query encoder, built on first use (once per process)."""
        with self._encoder_lock:
            if self.encoder is None:
                from ..index.embed import QueryEncoder

                if not (self.index.settings.get("source") or {}):
                    raise HTTPException(409, "this index does not record the model that made it, so it cannot "
                                             "describe uploaded images (search by id instead)")
                self.encoder = QueryEncoder(self.index.settings, device=self.device)
            return self.encoder

    # --- uploads --------------------------------------------------------------------------
    def read_upload(self, file: UploadFile) -> tuple[bytes, str, tuple[int, int]]:
        """Bytes, PIL format and (w, h) of an uploaded image, after the type and size checks."""
        ctype = (file.content_type or "").split(";")[0].strip().lower()
        if ctype not in CONTENT_TYPES:
            raise HTTPException(415, f"unsupported content type {ctype or 'none'!r}; send one of "
                                     f"{', '.join(sorted(CONTENT_TYPES))}")
        data = file.file.read(self.limits.max_request_bytes + 1)
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        if len(data) > self.limits.max_request_bytes:
            raise HTTPException(413, f"image too large (limit {self.limits.max_request_bytes} bytes)")
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
        except Image.DecompressionBombError as exc:
            raise HTTPException(413, f"image has too many pixels: {exc}") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise HTTPException(415, "the upload is not a readable image") from None
        if fmt not in SUFFIX:
            raise HTTPException(415, f"image format {fmt} is not accepted")
        if w * h > self.limits.max_pixels:
            raise HTTPException(413, f"image has {w}x{h} = {w * h} pixels, the limit is {self.limits.max_pixels}")
        return data, fmt, (w, h)

    def encode_bytes(self, data: bytes, fmt: str, bbox) -> Any:
        from ..extract import ImageError

        encoder = self.get_encoder()
        fd, tmp = tempfile.mkstemp(suffix=SUFFIX[fmt], prefix="cbir-query-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return encoder.encode(tmp, bbox)
        except ImageError as exc:
            raise HTTPException(400, f"cannot use the image: {exc.reason}") from None
        finally:
            os.unlink(tmp)

    # --- thumbnails -----------------------------------------------------------------------
    def thumbnail(self, id_: int, size: int) -> bytes:
        key = (int(id_), int(size))
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            path = self.index.get(id_).path
        except KeyError:
            raise HTTPException(404, f"image id {id_} is not in the index") from None
        try:
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > self.limits.max_pixels:
                    raise HTTPException(413, f"image {id_} is too large to make a thumbnail")
                im.draft("RGB", (size, size))
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
        except FileNotFoundError:
            raise HTTPException(404, f"the file of image {id_} is no longer there") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise HTTPException(404, f"the file of image {id_} cannot be read: {exc}") from None
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self.limits.thumb_cache:
                self._thumbs.popitem(last=False)
        return data


def parse_bbox(text: str | None, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """"x1,y1,x2,y2" in original pixels -> a box inside the image, or HTTP 400."""
    from ..extraction.images import ImageError, clip_box
    from ..extraction.images import parse_bbox as parse

    try:
        box = parse(text)
        if box is None:
            return None
        x1, y1, x2, y2 = clip_box("bbox", box, *size)
    except (ValueError, ImageError) as exc:
        raise HTTPException(400, str(exc)) from None
    return float(x1), float(y1), float(x2), float(y2)


def _hits_json(hits) -> list[dict[str, Any]]:
    return [{"id": h.id, "name": Path(h.path).name, "score": round(h.score, 6), "thumb": f"/api/thumb/{h.id}"}
            for h in hits]


def create_app(index: Index | str | os.PathLike[str], *, index_path: str | os.PathLike[str] | None = None,
               limits: Limits | None = None, read_only: bool = False, device: str = "auto",
               encoder: Any = None) -> FastAPI:
    """The app for an index (an open ``Index`` + where to save it, or the index folder)."""
    if not isinstance(index, Index):
        index_path = index
        index = Index.load(index, device=device)
    if index_path is None and not read_only:
        raise ValueError("create_app needs index_path to save additions (or read_only=True)")
    svc = Service(index=index, index_path=Path(index_path) if index_path else Path("."), limits=limits or Limits(),
                  read_only=read_only, device=device, encoder=encoder)
    app = FastAPI(title="cbir search", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.service = svc
    app.add_middleware(BodyLimit, limit=svc.limits.max_request_bytes)

    def check_top(top: int) -> int:
        if not 1 <= top <= svc.limits.max_top:
            raise HTTPException(400, f"top must be between 1 and {svc.limits.max_top}")
        return top

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        s = svc.index.settings
        return {"status": "ok", "images": len(svc.index), "type": svc.index.kind, "dim": svc.index.dim,
                "model": s.get("model"), "pooling": s.get("pooling"), "whitening": s.get("whitening"),
                "can_describe_images": bool(s.get("source")), "model_loaded": svc.encoder is not None,
                "read_only": svc.read_only}

    @app.post("/api/search")
    def search_upload(file: UploadFile = File(...), bbox: str | None = Form(None), top: int = Form(20)) -> dict:
        check_top(top)
        t0 = time.perf_counter()
        data, fmt, size = svc.read_upload(file)
        box = parse_bbox(bbox, size)
        q = svc.encode_bytes(data, fmt, box)
        hits = svc.index.search(q, top)[0]
        return {"results": _hits_json(hits), "took_ms": round(1000 * (time.perf_counter() - t0), 2),
                "query": {"width": size[0], "height": size[1], "bbox": box}}

    @app.get("/api/search/{image_id}")
    def search_id(image_id: int, top: int = Query(20)) -> dict:
        check_top(top)
        t0 = time.perf_counter()
        try:
            q = svc.index.vector(image_id)
        except KeyError:
            raise HTTPException(404, f"image id {image_id} is not in the index") from None
        hits = svc.index.search(q, top)[0]
        return {"results": _hits_json(hits), "took_ms": round(1000 * (time.perf_counter() - t0), 2),
                "query": {"id": image_id, "thumb": f"/api/thumb/{image_id}"}}

    @app.post("/api/images", status_code=201)
    def add_image(file: UploadFile = File(...)) -> dict:
        if svc.read_only:
            raise HTTPException(403, "this server is read-only (started with --read-only)")
        data, fmt, size = svc.read_upload(file)
        digest = hashlib.sha256(data).hexdigest()
        target = svc.index_path / "uploads" / f"{digest[:32]}{SUFFIX[fmt]}"
        existing = svc.index.id_of_path(str(target.resolve()))
        if existing is not None:
            return JSONResponse({"id": existing, "added": False, "detail": "this image is already in the index"},
                                status_code=200)
        q = svc.encode_bytes(data, fmt, None)
        from ..fileio import atomic_write_bytes

        atomic_write_bytes(target, data)
        with svc._save_lock:
            try:
                new_id = int(svc.index.add(q[None, :], [str(target.resolve())], sizes=[size])[0])
            except IncompatibleDescriptorError as exc:
                raise HTTPException(409, str(exc)) from None
            svc.index.save(svc.index_path)
        return {"id": new_id, "added": True, "name": target.name, "images": len(svc.index)}

    @app.get("/api/images/{image_id}")
    def image_info(image_id: int) -> dict:
        try:
            rec = svc.index.get(image_id)
        except KeyError:
            raise HTTPException(404, f"image id {image_id} is not in the index") from None
        return {"id": rec.id, "name": Path(rec.path).name, "added": rec.added, "width": rec.width,
                "height": rec.height, "thumb": f"/api/thumb/{rec.id}"}

    @app.get("/api/thumb/{image_id}")
    def thumb(image_id: int, size: int = Query(256)) -> Response:
        lo, hi = svc.limits.thumb_sizes
        if not lo <= size <= hi:
            raise HTTPException(400, f"size must be between {lo} and {hi}")
        return Response(svc.thumbnail(image_id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    return app
