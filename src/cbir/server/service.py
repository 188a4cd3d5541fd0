"""The state the service's routes share: the index, the query encoder, the upload store, caches, limits.

Checks on an upload (before any decoding of pixels): an image content type (415), at most
``Limits.max_request_bytes`` (413), a format Pillow reads from the header among the accepted ones
(415), at most ``Limits.max_pixels`` pixels (413: decompression bombs). Query images are described
from memory; only photos added to the index are written to disk (``uploads.UploadStore``).
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from fastapi import HTTPException, UploadFile
from PIL import Image, ImageOps, UnidentifiedImageError

from ..index import Index, latest_generation, open_for_write
from ..index.index import MANIFEST
from ..index.writer import IndexLockedError
from .security import Guard
from .uploads import UploadStore

CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/bmp": "BMP",
                 "image/gif": "GIF", "image/tiff": "TIFF"}
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 20 * 1024 * 1024   # whole request body
    max_pixels: int = 40_000_000                # width x height of an uploaded image
    max_top: int = 500                          # results per search
    thumb_sizes: tuple[int, int] = (32, 1024)   # allowed thumbnail sizes
    thumb_cache: int = 512                      # thumbnails kept in memory
    max_store_bytes: int | None = 10 * 10**9    # total size of the photos added through the service


@dataclass
class Upload:
    """An uploaded image after the checks: its bytes, Pillow format, (width, height) and the client's file name."""

    data: bytes
    format: str
    size: tuple[int, int]
    filename: str | None = None


@dataclass
class Service:
    """Everything the app shares between requests."""

    index: Index
    index_path: Path
    limits: Limits = field(default_factory=Limits)
    read_only: bool = False
    device: str = "auto"
    encoder: Any = None
    guard: Guard = field(default_factory=Guard)
    uploads: UploadStore | None = None
    rerank: Any = None                          # a Rerank or Recipe applied to every search (None: plain)
    local: Any = None                           # cbir.index.local.LocalFeatures when searches verify
    _encoder_lock: threading.Lock = field(default_factory=threading.Lock)
    _write_lock: threading.Lock = field(default_factory=threading.Lock)
    _thumbs: "OrderedDict[tuple[int, int], bytes]" = field(default_factory=OrderedDict)
    _thumb_lock: threading.Lock = field(default_factory=threading.Lock)
    _refresh_lock: threading.Lock = field(default_factory=threading.Lock)
    _encode_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-encode"))
    _checked: float = 0.0
    refresh_every: float = 0.5   # seconds between two looks at the manifest for a newer generation
    lock_timeout: float = 30.0   # seconds a write waits for another writer (CLI) before a 409

    def __post_init__(self) -> None:
        if self.uploads is None:
            self.uploads = UploadStore(self.index_path / "uploads", self.limits.max_store_bytes)
        if getattr(self.rerank, "verify", None) is not None and self.local is None:
            from ..index.local import NO_LOCAL, LocalFeatures, has_local

            if not has_local(self.index_path):
                raise ValueError(NO_LOCAL(self.index_path, self.rerank.verify.k))
            self.local = LocalFeatures(self.index_path)

    # --- spatial verification ---------------------------------------------------------------
    def search_settings(self) -> Any:
        """The re-ranking of a search: ``rerank``, without its verification when the index's local
        features are gone (a search never fails for want of them)."""
        if getattr(self.rerank, "verify", None) is None:
            return self.rerank
        if self.local is None or self.local.store() is None:
            return self.rerank.with_verify(None)
        return self.rerank

    def verifier(self, query: Any) -> Any:
        """The verifier of one search (None without verification): ``query`` an indexed image's id, or
        an :class:`Upload` and its box (SIFT extracted on the encoding thread when first needed; an
        image SIFT cannot use has no features: 0 inliers). It keeps the correspondences."""
        if getattr(self.search_settings(), "verify", None) is None:
            return None
        from ..index.local import index_verifier

        device = self.device if self.device in ("cpu", "cuda") else "auto"
        if isinstance(query, int):
            return index_verifier(self.local, query, device=device, keep=True)
        upload, bbox = query
        settings = self.local.settings

        def extract():
            from ..extract import ImageError
            from ..local.features import extract_local

            try:
                return self._encode_thread.submit(extract_local, upload.data, settings, bbox, device=device).result()
            except ImageError:
                return None

        return index_verifier(self.local, extract, device=device, keep=True)

    def after_add(self, new_id: int, path: str) -> str | None:
        """Describe an added image's local features (when the index has them, whether or not this
        service verifies); a problem is returned as a note (the image is added either way; the next
        ``cbir index add/remove`` extracts it)."""
        from ..index.local import add_local, has_local

        if not has_local(self.index_path):
            return None

        try:
            res = self._encode_thread.submit(add_local, self.index_path, [(new_id, path)]).result()
        except Exception as exc:  # the index has the image; its local features can be made later
            return f"local features not extracted ({type(exc).__name__}: {exc})"
        return None if res["extracted"] else "local features not extracted (SIFT could not read the image)"

    def after_remove(self, image_id: int) -> None:
        """Drop a removed image's local features (a failure leaves them for the next sync: ids are never reused)."""
        from ..index.local import has_local, remove_local

        if not has_local(self.index_path):
            return

        try:
            remove_local(self.index_path, [image_id])
        except Exception:  # noqa: BLE001 - the index is changed; a stale key is harmless
            pass

    # --- the index ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Serve the newest generation: when another writer (``cbir index add``) saved one, load it.

        Looks at the manifest at most every ``refresh_every`` seconds, from one request at a time;
        requests meanwhile are answered from the generation already loaded.
        """
        now = time.monotonic()
        if self.index.path is None or now - self._checked < self.refresh_every:
            return
        if not self._refresh_lock.acquire(blocking=False):
            return
        try:
            self._checked = now
            try:
                stale = self.index.path is not None and latest_generation(self.index.path) > self.index.generation
            except (OSError, ValueError):  # the folder is being replaced or is gone: keep serving what is loaded
                return
            if stale:
                with self._write_lock:
                    self.index.reload_if_stale()
                self._forget_thumbs()
        finally:
            self._refresh_lock.release()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Index]:
        """The newest generation of the index, for a change under the index's writer lock (shared with
        ``cbir index add/remove``); a new generation is saved when the block succeeds. 409 when another
        writer holds the lock for over ``lock_timeout`` seconds."""
        with self._write_lock:
            if not (self.index_path / MANIFEST).is_file():  # an index given in memory, saved here for the first time
                self.index_path.mkdir(parents=True, exist_ok=True)
                self.index.save(self.index_path)
            try:
                with open_for_write(self.index_path, index=self.index, timeout=self.lock_timeout) as index:
                    yield index
            except IndexLockedError as exc:
                raise HTTPException(409, f"the index is being changed by another program; try again ({exc})") from None
        self._forget_thumbs()

    def _forget_thumbs(self) -> None:
        with self._thumb_lock:
            self._thumbs.clear()

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
    def read_upload(self, file: UploadFile) -> Upload:
        """The uploaded image after the type and size checks (HTTPException 400/413/415 otherwise)."""
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
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise HTTPException(415, "the upload is not a readable image") from None
        if fmt not in SUFFIX:
            raise HTTPException(415, f"image format {fmt} is not accepted")
        if w * h > self.limits.max_pixels:
            raise HTTPException(413, f"image has {w}x{h} = {w * h} pixels, the limit is {self.limits.max_pixels}")
        return Upload(data, fmt, (w, h), file.filename)

    def encode(self, upload: Upload, bbox: Box | None) -> np.ndarray:
        """(D,) descriptor of the uploaded image (decoded in memory), cropped to ``bbox``; 400 if unusable.

        Always on the service's one encoding thread, whichever request thread asks: decoding, resizing
        and the forward pass allocate tens of MB per query, and glibc gives each thread its own malloc
        arena that keeps such memory after it is freed. Spread over the ~40 request threads, the
        service's RSS grew with every thread that had encoded once (1.15 -> 2.2 GB in a minute of 30
        clients); on one thread it stays flat. The encoder runs one image at a time anyway.
        """
        from ..extract import ImageError

        encoder = self.get_encoder()
        try:
            return self._encode_thread.submit(encoder.encode, upload.data, bbox).result()
        except ImageError as exc:
            raise HTTPException(400, f"cannot use the image: {exc.reason}") from None

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
                    raise HTTPException(404, f"image {id_} is too large to make a thumbnail")
                im.draft("RGB", (size, size))
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
        except FileNotFoundError:
            raise HTTPException(404, f"the file of image {id_} is no longer there") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise HTTPException(404, f"the file of image {id_} cannot be read: {exc}") from None
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self.limits.thumb_cache:
                self._thumbs.popitem(last=False)
        return data


def parse_bbox(text: str | None, size: tuple[int, int]) -> Box | None:
    """"x1,y1,x2,y2" in original pixels -> a box inside the image (whole pixels), or HTTP 400."""
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
