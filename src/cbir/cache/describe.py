"""Describe images once: extraction through the per-image cache.

    cache = DescriptorCache.for_spec(ModelSpec("efficientnet_lite0", "gem"), imsize=512,
                                     scales=(1, 0.7071, 0.5), device="cpu")
    res = extract_with_cache(lambda: spec.build(), paths, bboxes=boxes, cache=cache, imsize=512, ...)

Each input is named by (the SHA-256 of its file's bytes, its crop box): the box rounded and clipped
to the image as the extractor does (:func:`cbir.extraction.images.clip_box`), and a box covering
the whole image counts as no box. Inputs whose name is in the store are read from it; the others
are described once each (an image named twice in one call, e.g. a whole-image query that is also a
database photo, runs once), in one :func:`cbir.extraction.loop.extract` call, and stored. The network is
built (``model`` may be a zero-argument function) only when something is left to describe.
Without a cache the same de-duplication applies within the call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .digest import DigestMemo, bytes_digest, default_cache_dir
from .identity import settings_identity, source_identity, spec_identity
from .vectors import ItemKey, VectorCache, max_cache_bytes, prune, store_folder

__all__ = ["DescriptorCache", "CacheStats", "LazyNet", "extract_with_cache", "item_keys", "box_key"]

Box = tuple[float, float, float, float]


@dataclass
class CacheStats:
    """What one :func:`extract_with_cache` call did: ``described`` images run through the network
    (the forward passes), ``hits`` read from the store, ``repeats`` inputs equal to another input."""

    inputs: int = 0
    hits: int = 0
    described: int = 0
    repeats: int = 0
    stored: int = 0
    damaged: int = 0

    def line(self) -> str:
        return (f"{self.inputs} images: {self.hits} from the cache, {self.described} described"
                + (f", {self.repeats} repeated inputs described once" if self.repeats else ""))


class LazyNet:
    """A network built on first call (``LazyNet(spec.build)``); ``net`` is None until then."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self.net: Any = None

    def __call__(self) -> Any:
        if self.net is None:
            self.net = self._build()
        return self.net


@dataclass
class DescriptorCache:
    """One store (:class:`cbir.cache.vectors.VectorCache`) of a (model, weights, settings) key and
    the digest memo of the cache folder ``root``."""

    root: Path
    store: VectorCache
    memo: DigestMemo
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, model_fields: dict[str, Any], settings_fields: dict[str, Any],
             root: str | os.PathLike[str] | None = None, memo: DigestMemo | None = None) -> "DescriptorCache":
        root = Path(default_cache_dir() if root is None else root).expanduser()
        fields = {"model": model_fields, "settings": settings_fields}
        return cls(root, VectorCache(root, fields), memo or DigestMemo(root), fields)

    @classmethod
    def for_spec(cls, spec: Any, *, imsize: int | None, scales: Sequence[float], device: Any = "auto",
                 precision: str = "auto", backend: str = "auto", decode: str = "auto",
                 root: str | os.PathLike[str] | None = None) -> "DescriptorCache":
        """The cache of a :class:`cbir.model.ModelSpec` with these extraction settings (``device`` and
        ``precision`` resolved as :func:`cbir.extract.extract` resolves them)."""
        root = Path(default_cache_dir() if root is None else root).expanduser()
        memo = DigestMemo(root)
        return cls.open(spec_identity(spec, memo.digest),
                        resolved_settings(imsize, scales, device, precision, backend, decode), root, memo)

    @classmethod
    def for_source(cls, source: dict[str, Any], *, imsize: int | None, scales: Sequence[float],
                   device: Any = "auto", precision: str = "auto", backend: str = "auto", decode: str = "auto",
                   root: str | os.PathLike[str] | None = None) -> "DescriptorCache":
        """The cache of an index's model (its ``source`` settings), e.g. for ``cbir index add``."""
        root = Path(default_cache_dir() if root is None else root).expanduser()
        memo = DigestMemo(root)
        return cls.open(source_identity(source, memo.digest),
                        resolved_settings(imsize, scales, device, precision, backend, decode), root, memo)

    def close(self) -> None:
        self.store.close()


def resolved_settings(imsize: int | None, scales: Sequence[float], device: Any, precision: str, backend: str,
                      decode: str) -> dict[str, Any]:
    """:func:`cbir.cache.identity.settings_identity` with ``device``/``backend``/``precision``/``decode``
    resolved (:func:`cbir.extraction.backends.resolve_backend`: "auto" is ONNX Runtime fp32 on the CPU)."""
    from ..device import resolve_device
    from ..extraction.backends import resolve_backend

    dev = resolve_device(device)
    dec = ("cuda" if dev.type == "cuda" else "cpu") if decode == "auto" else decode
    backend, precision = resolve_backend(dev, backend, precision)
    return settings_identity(imsize=imsize, scales=scales, precision=precision,
                             backend=backend, device_type=dev.type, decode=dec)


def box_key(path: Any, box: Box | None) -> str | None:
    """"" for no box or a box covering the whole image, else "x1,y1,x2,y2" of the clipped whole-pixel
    box (as the extractor crops); None when the image's size cannot be read (not cacheable)."""
    if box is None:
        return ""
    from ..extraction.images import ImageError, clip_box, image_size

    try:
        w, h = image_size(path)
        x1, y1, x2, y2 = clip_box(path, box, w, h)
    except (ImageError, OSError, ValueError):
        return None
    if (x1, y1, x2, y2) == (0, 0, w, h):
        return ""
    return f"{x1},{y1},{x2},{y2}"


def item_keys(images: Sequence[Any], bboxes: Sequence[Box | None], memo: DigestMemo) -> list[ItemKey | None]:
    """The (content digest, box key) of each input (None: unreadable, left to the extractor to report)."""
    files = [i for i, im in enumerate(images) if not isinstance(im, (bytes, bytearray))]
    digests: list[str | None] = [None] * len(images)
    for i, d in zip(files, memo.digests([images[i] for i in files])):
        digests[i] = d
    for i, im in enumerate(images):
        if isinstance(im, (bytes, bytearray)) and im:
            digests[i] = bytes_digest(im)
    out: list[ItemKey | None] = []
    for im, box, d in zip(images, bboxes, digests):
        b = None if d is None else box_key(im, box)
        out.append(None if d is None or b is None else (d, b))
    return out


def _run_extract(model: Any, images: Sequence[Any], **kw: Any):
    """One extraction call (a seam: tests count the images that reach the network)."""
    from ..extraction.loop import extract

    return extract(model, images, **kw)


def extract_with_cache(
    model: Any,
    images: Sequence[str | os.PathLike[str] | bytes],
    *,
    cache: DescriptorCache | None,
    bboxes: Sequence[Box | None] | None = None,
    stats: CacheStats | None = None,
    **kw: Any,
):
    """:func:`cbir.extract.extract` of ``images`` through ``cache`` (see the module docstring).

    ``model``: a RetrievalNet, or a function returning one (called only when something must be
    described). ``kw`` go to :func:`cbir.extract.extract` (imsize, scales, device, precision, backend,
    strict, progress, ...; they must be the settings ``cache`` was opened with). Returns its
    :class:`cbir.extraction.loop.ExtractResult` (rows in input order; ``failed`` as it reports them).
    ``stats`` (a :class:`CacheStats`) is filled in.
    """
    from ..extraction.loop import ExtractResult
    from ..extraction.images import label

    paths = [im if isinstance(im, (bytes, bytearray)) else Path(im) for im in images]
    boxes = list(bboxes) if bboxes is not None else [None] * len(paths)
    if len(boxes) != len(paths):
        raise ValueError(f"{len(boxes)} crop boxes for {len(paths)} images")
    st = stats if stats is not None else CacheStats()
    st.inputs = len(paths)
    memo = cache.memo if cache is not None else DigestMemo(None)
    keys = item_keys(paths, boxes, memo)
    rejected = cache.store.rejected if cache is not None else 0
    found = cache.store.get([k for k in keys if k is not None]) if cache is not None else {}
    if cache is not None:
        st.damaged = cache.store.rejected - rejected
    st.hits = sum(1 for k in keys if k is not None and k in found)
    # one representative input per missing key (and every input without a key)
    todo: list[int] = []
    first: dict[ItemKey, int] = {}
    for i, k in enumerate(keys):
        if k is not None and k in found:
            continue
        if k is not None and k in first:
            st.repeats += 1
            continue
        if k is not None:
            first[k] = i
        todo.append(i)
    vectors: dict[int, np.ndarray] = {}
    reasons: dict[int, str] = {}
    net = None
    if todo:
        net = model() if callable(model) and not hasattr(model, "pool") else model
        res = _run_extract(net, [paths[i] for i in todo], bboxes=[boxes[i] for i in todo], **kw)
        st.described = len(todo)
        for row, j in enumerate(res.ok.tolist()):
            vectors[todo[j]] = res.vectors[row]
        left = iter(res.failed)  # reported in input order, one per failed input
        for i in (i for i in todo if i not in vectors):
            reasons[i] = next(left, {}).get("reason", "unreadable")
        new = [(keys[i], v) for i, v in vectors.items() if keys[i] is not None]
        if cache is not None and new and _cacheable(net):
            st.stored = cache.store.put(new, about=dict(net.describe()))
            if st.stored:
                _maybe_prune(cache.root)
    # every input in order: its own row, the stored row, or the row of the input it repeats
    by_key = {keys[i]: i for i in todo if keys[i] is not None}
    rows, ok, failed = [], [], []
    for i, k in enumerate(keys):
        v = vectors.get(i)
        if v is None and k is not None:
            v = found[k] if k in found else vectors.get(by_key.get(k, -1))
        if v is None:
            failed.append({"path": label(paths[i]), "reason": reasons.get(i, reasons.get(by_key.get(k, -1), "unreadable"))})
            continue
        rows.append(np.asarray(v, np.float32))
        ok.append(i)
    if rows:
        vecs = np.stack(rows).astype(np.float32)
    else:
        dim = int(net.dim) if net is not None else int((cache.store.about or {}).get("dim", 0)) if cache else 0
        vecs = np.zeros((0, dim), np.float32)
    return ExtractResult(vectors=vecs, ok=np.asarray(ok, np.int64), failed=failed)


def _cacheable(net: Any) -> bool:
    """An unfitted-then-fitted BoW codebook depends on the images at hand: such descriptors are not kept."""
    pooling = getattr(net, "pooling", None)
    return getattr(pooling, "name", "") != "bow"


def _maybe_prune(root: Path) -> None:
    folder = store_folder(root)
    try:
        total = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".sqlite", ".sqlite-wal"))
    except OSError:
        return
    if total > max_cache_bytes():
        prune(root)


def describe_files(
    net: Any,
    files: Sequence[str | os.PathLike[str]],
    *,
    spec: Any | None,
    cache_dir: str | os.PathLike[str] | None,
    imsize: int | None,
    scales: Sequence[float],
    device: Any = "auto",
    precision: str = "auto",
    backend: str = "auto",
    stats: CacheStats | None = None,
    **kw: Any,
):
    """:func:`extract_with_cache` of ``files`` with ``net``, through the cache of ``spec`` (a
    :class:`cbir.model.ModelSpec`) under ``cache_dir`` when both are given and its pooling is
    cacheable (:func:`cbir.cache.identity.cacheable_pooling`), else without a cache; the cache is
    closed afterwards. ``kw`` go to :func:`cbir.extract.extract` (batch_size, progress, ...)."""
    from .identity import cacheable_pooling

    cache = None
    if cache_dir is not None and spec is not None and cacheable_pooling(spec.pooling):
        cache = DescriptorCache.for_spec(spec, imsize=imsize, scales=scales, device=device, precision=precision,
                                         backend=backend, root=cache_dir)
    try:
        return extract_with_cache(net, files, cache=cache, stats=stats, imsize=imsize, scales=tuple(scales),
                                  device=device, precision=precision, backend=backend, **kw)
    finally:
        if cache is not None:
            cache.close()
