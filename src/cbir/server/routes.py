"""The HTTP API as an ``APIRouter``: every route gets the shared ``Service`` through a dependency.

Ids are int64 (0 .. 2^63-1): anything else is a 422 before a route runs. Writes go through
``write_access`` (read-only -> 403, foreign Origin -> 403, missing or wrong token -> 401).
Every response a route can give is declared, so the OpenAPI schema is the whole contract.
"""

from __future__ import annotations

import time
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from ..fileio import sha256_bytes
from ..index import IncompatibleDescriptorError
from ..pipeline import search_index
from .service import SUFFIX, Service, parse_bbox
from .uploads import StoreFull

INT64_MAX = 2**63 - 1


class Error(BaseModel):
    detail: str


class Health(BaseModel):
    status: str
    images: int
    type: str
    dim: int
    model: str | None = None
    pooling: str | None = None
    whitening: Any = None
    can_describe_images: bool
    model_loaded: bool
    read_only: bool
    writes_need_token: bool


class Hit(BaseModel):
    id: int
    name: str
    score: float
    thumb: str
    inliers: int | None = None      # spatial verification: inlier count (-1: the query's own photo)
    matches: list[list[float]] | None = None  # with matches=true: [x_q, y_q, x_r, y_r] per inlier (pixels)
    size: list[int] | None = None   # with matches: [width, height] of this image, the frame of x_r, y_r


class SearchResponse(BaseModel):
    results: list[Hit]
    took_ms: float
    query: dict[str, Any]


class Added(BaseModel):
    id: int
    added: bool
    name: str | None = None
    images: int | None = None
    detail: str | None = None


class Removed(BaseModel):
    id: int
    removed: bool
    images: int


class ImageInfo(BaseModel):
    id: int
    name: str
    added: float
    width: int | None = None
    height: int | None = None
    thumb: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": Error} for c in codes}


def get_service(request: Request) -> Service:
    """The app's shared state, serving the newest generation of the index."""
    svc: Service = request.app.state.service
    svc.refresh()
    return svc


ServiceDep = Annotated[Service, Depends(get_service)]
ImageId = Annotated[int, Path(ge=0, le=INT64_MAX, description="image id (int64)")]
bearer = HTTPBearer(auto_error=False, description="the write token (cbir serve --token-file / $CBIR_TOKEN)")


def write_access(request: Request, svc: ServiceDep,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Service:
    """The service, for a request allowed to change the index (else 401/403)."""
    if svc.read_only:
        raise HTTPException(403, "this server is read-only (started with --read-only)")
    h = request.headers
    why = svc.guard.foreign_origin(h.get("origin"), h.get("host"), h.get("sec-fetch-site"))
    if why is not None:
        raise HTTPException(403, f"write refused: {why}")
    if not svc.guard.token_ok(credentials.credentials if credentials else None):
        raise HTTPException(401, "this write needs the server's token (Authorization: Bearer TOKEN)",
                            headers={"WWW-Authenticate": "Bearer"})
    return svc


WriterDep = Annotated[Service, Depends(write_access)]
router = APIRouter(prefix="/api")


def check_top(svc: Service, top: int) -> int:
    if not 1 <= top <= svc.limits.max_top:
        raise HTTPException(400, f"top must be between 1 and {svc.limits.max_top}")
    return top


#: Correspondences returned per verified result at most (evenly chosen among its inliers).
MAX_MATCH_LINES = 500


def _hits(hits, verifier=None, matches: bool = False) -> list[Hit]:
    out = []
    for h in hits:
        extra: dict[str, Any] = {}
        if getattr(h, "inliers", None) is not None:
            extra["inliers"] = int(h.inliers)
            if matches and verifier is not None:
                extra.update(_matches(verifier, h.id))
        out.append(Hit(id=h.id, name=FilePath(h.path).name, score=round(h.score, 6), thumb=f"/api/thumb/{h.id}",
                       **extra))
    return out


def _matches(verifier, image_id: int) -> dict[str, Any]:
    """{"matches": [[x_q, y_q, x_r, y_r], ...] (at most MAX_MATCH_LINES), "size": [w, h]} of a verified
    pair, for drawing why it matched; {} when none are kept."""
    import numpy as np

    m = verifier.matches(0, image_id)
    sizes = verifier.size_of(0, image_id)
    if m is None:
        return {}
    if len(m) > MAX_MATCH_LINES:
        m = m[np.linspace(0, len(m) - 1, MAX_MATCH_LINES).round().astype(int)]
    out: dict[str, Any] = {"matches": [[round(float(v), 2) for v in row] for row in m]}
    if sizes is not None:
        out["size"] = [int(v) for v in sizes[1]]
    elif m is not None and len(m):  # the query's own photo: the query's frame
        q = verifier.query_of(0)
        if q is not None:
            out["size"] = [int(v) for v in q.size]
    return out


def _search(svc: Service, q, top: int, query: Any, matches: bool) -> tuple[list[Hit], dict[str, Any]]:
    """Hits of a search (verified when the service verifies), and what the query record adds."""
    rerank = svc.search_settings()
    verifier = svc.verifier(query)
    try:
        hits, applied = search_index(svc.index, q, top, rerank, verifier=verifier)
    except (OSError, ValueError, RuntimeError) as exc:  # damaged local features, COLMAP failing: search without
        if verifier is None:
            raise
        hits, applied = search_index(svc.index, q, top, rerank.with_verify(None))
        return _hits(hits), {"verify": f"failed, results unverified ({type(exc).__name__})"}
    extra: dict[str, Any] = {}
    if "verify" in applied:
        v = applied["verify"]
        extra["verify"] = {key: v[key] for key in ("k", "min_inliers", "order", "verified", "pairs") if key in v}
        qf = verifier.query_of(0)
        if qf is not None:
            extra["size"] = [int(x) for x in qf.size]
    return _hits(hits, verifier, matches), extra


@router.get("/health", response_model=Health)
def health(svc: ServiceDep) -> Health:
    s = svc.index.settings
    return Health(status="ok", images=len(svc.index), type=svc.index.kind, dim=svc.index.dim, model=s.get("model"),
                  pooling=s.get("pooling"), whitening=s.get("whitening"), can_describe_images=bool(s.get("source")),
                  model_loaded=svc.encoder is not None, read_only=svc.read_only,
                  writes_need_token=svc.guard.token is not None)


@router.post("/search", response_model=SearchResponse, responses=_errors(400, 409, 413, 415))
def search_upload(svc: ServiceDep, file: Annotated[UploadFile, File()], bbox: Annotated[str | None, Form()] = None,
                  top: Annotated[int, Form()] = 20, matches: Annotated[bool, Form()] = False) -> SearchResponse:
    """Search with an uploaded image (multipart ``file``), optionally inside ``bbox`` = "x1,y1,x2,y2".

    When the index verifies its searches (built with ``--verify K``), each result of the query's
    verified top K has ``inliers``; ``matches=true`` adds each one's inlier correspondences
    (``[x_q, y_q, x_r, y_r]`` in the query's and the result's own pixels, the frames ``query.size``
    and the result's ``size``)."""
    check_top(svc, top)
    t0 = time.perf_counter()
    up = svc.read_upload(file)
    box = parse_bbox(bbox, up.size)
    q = svc.encode(up, box)
    results, extra = _search(svc, q, top, (up, box), matches)
    return SearchResponse(results=results, took_ms=round(1000 * (time.perf_counter() - t0), 2),
                          query={"width": up.size[0], "height": up.size[1], "bbox": box, **extra})


@router.get("/search/{image_id}", response_model=SearchResponse, responses=_errors(400, 404))
def search_id(svc: ServiceDep, image_id: ImageId, top: int = Query(20), matches: bool = Query(False)) -> SearchResponse:
    """Search with an indexed image (``inliers``, ``matches``: as ``POST /api/search``)."""
    check_top(svc, top)
    t0 = time.perf_counter()
    try:
        q = svc.index.vector(image_id)
    except KeyError:
        raise HTTPException(404, f"image id {image_id} is not in the index") from None
    results, extra = _search(svc, q, top, int(image_id), matches)
    return SearchResponse(results=results, took_ms=round(1000 * (time.perf_counter() - t0), 2),
                          query={"id": image_id, "thumb": f"/api/thumb/{image_id}", **extra})


@router.post("/images", status_code=201, response_model=Added,
             responses={200: {"model": Added, "description": "already in the index"},
                        **_errors(400, 401, 403, 409, 413, 415)})
def add_image(svc: WriterDep, file: Annotated[UploadFile, File()]) -> Any:
    """Add an uploaded image to the index (stored under the index's uploads/ with its file name made safe)."""
    up = svc.read_upload(file)
    digest = sha256_bytes(up.data)
    existing = _already_indexed(svc, digest, len(up.data))
    if existing is not None:
        return JSONResponse({"id": existing, "added": False, "detail": "this image is already in the index"})
    q = svc.encode(up, None)  # outside the lock: the slow part
    try:
        with svc.writing() as index:
            existing = _already_indexed(svc, digest, len(up.data))  # another request may have added it meanwhile
            if existing is not None:
                raise _Duplicate(existing)  # leave the block without saving a generation
            try:
                target = svc.uploads.find(digest) or svc.uploads.put(up.data, up.filename, SUFFIX[up.format], digest)
            except StoreFull as exc:
                raise HTTPException(413, str(exc)) from None
            try:
                new_id = int(index.add(q[None, :], [str(target)], sizes=[up.size],
                                       settings=svc.get_encoder().query_settings)[0])
            except IncompatibleDescriptorError as exc:
                svc.uploads.delete(target)
                raise HTTPException(409, str(exc)) from None
    except _Duplicate as dup:
        return JSONResponse({"id": dup.id, "added": False, "detail": "this image is already in the index"})
    note = svc.after_add(new_id, str(target))  # its local features, when the index verifies
    return Added(id=new_id, added=True, name=target.name, images=len(svc.index), detail=note)


class _Duplicate(Exception):
    def __init__(self, id_: int) -> None:
        self.id = id_


def _already_indexed(svc: Service, digest: str, size: int) -> int | None:
    """The id of the indexed image holding these bytes (the rule of `cbir index add`,
    :func:`cbir.index.duplicates.indexed_copies`), the upload store's file tried first."""
    from ..index.duplicates import indexed_copies

    return indexed_copies(svc.index, {digest: size}, known=svc.uploads.find).get(digest)


@router.delete("/images/{image_id}", response_model=Removed, responses=_errors(401, 403, 404))
def remove_image(svc: WriterDep, image_id: ImageId) -> Removed:
    """Remove an image from the index (like ``cbir index remove``); a photo added through the service is deleted."""
    with svc.writing() as index:
        try:
            path = index.get(image_id).path
            index.remove([image_id])
        except KeyError:
            raise HTTPException(404, f"image id {image_id} is not in the index") from None
    svc.uploads.delete(path)
    svc.after_remove(image_id)
    return Removed(id=image_id, removed=True, images=len(svc.index))


@router.get("/images/{image_id}", response_model=ImageInfo, responses=_errors(404))
def image_info(svc: ServiceDep, image_id: ImageId) -> ImageInfo:
    try:
        rec = svc.index.get(image_id)
    except KeyError:
        raise HTTPException(404, f"image id {image_id} is not in the index") from None
    return ImageInfo(id=rec.id, name=FilePath(rec.path).name, added=rec.added, width=rec.width, height=rec.height,
                     thumb=f"/api/thumb/{rec.id}")


@router.get("/thumb/{image_id}", response_class=Response, responses={
    200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}, **_errors(400, 404)})
def thumb(svc: ServiceDep, image_id: ImageId, size: int = Query(256)) -> Response:
    """JPEG thumbnail of an indexed image, longest side ``size``."""
    lo, hi = svc.limits.thumb_sizes
    if not lo <= size <= hi:
        raise HTTPException(400, f"size must be between {lo} and {hi}")
    return Response(svc.thumbnail(image_id, size), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
