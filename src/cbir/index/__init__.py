"""Persistent image index: exact (torch, CPU/GPU) and faiss (IVF-PQ, HNSW) search, SQLite metadata.

>>> idx = Index(dim=512, kind="exact", settings={"model": "efficientnet_lite0", "pooling": "gem"})
>>> ids = idx.add(vectors, paths)           # (N, 512) L2-normalised descriptors
>>> idx.save("photos.index")                # atomic; Index.load("photos.index") reopens it
>>> idx.search(query, k=20)                 # [[Hit(id, path, score), ...]] best first
>>> with open_for_write("photos.index") as idx:   # one writer at a time; newest generation; saved on exit
...     idx.add(more_vectors, more_paths)
"""

from .backends import DEFAULT_PARAMS, KINDS
from .exact import exact_topk
from .index import (COMPAT_KEYS, FORMAT, FORMAT_VERSION, Hit, IncompatibleDescriptorError, Index, StaleIndexError,
                    latest_generation, next_free_id)
from .store import ImageRecord

_WRITER = ("IndexLockedError", "open_for_write", "writer_lock")  # cbir.index.writer, imported on first use


def __getattr__(name: str):
    """The writer's names, imported when first used (filelock costs ~0.1 s that a search does not need)."""
    if name in _WRITER:
        from . import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COMPAT_KEYS", "DEFAULT_PARAMS", "FORMAT", "FORMAT_VERSION", "Hit", "ImageRecord",
    "IncompatibleDescriptorError", "Index", "IndexLockedError", "KINDS", "StaleIndexError", "exact_topk",
    "latest_generation", "next_free_id", "open_for_write", "writer_lock",
]
