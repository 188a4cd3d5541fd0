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
from .writer import IndexLockedError, open_for_write, writer_lock

__all__ = [
    "COMPAT_KEYS", "DEFAULT_PARAMS", "FORMAT", "FORMAT_VERSION", "Hit", "ImageRecord",
    "IncompatibleDescriptorError", "Index", "IndexLockedError", "KINDS", "StaleIndexError", "exact_topk",
    "latest_generation", "next_free_id", "open_for_write", "writer_lock",
]
