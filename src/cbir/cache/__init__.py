"""The extraction cache: every image is described once per (model, weights, settings).

- :mod:`.digest`   content digests of files (SHA-256), memoised per (path, device, inode, size, mtime_ns)
- :mod:`.identity` what a descriptor depends on (model, weights by content, settings, code version) and the key
- :mod:`.vectors`  the store: one SQLite file per key, rows keyed by (content digest, crop box); maintenance
- :mod:`.describe` extraction through the store (hits read, misses described once and kept)

Used by ``cbir extract``, ``cbir evaluate``, ``cbir tune``, ``cbir index build`` / ``index add`` and
:func:`cbir.pipeline.describe`. Nothing here imports torch at module level.
"""

from __future__ import annotations

from .digest import DigestMemo, default_cache_dir, file_digest
from .identity import CACHE_FORMAT_VERSION, EXTRACTION_VERSION, key_of

__all__ = ["CACHE_FORMAT_VERSION", "EXTRACTION_VERSION", "DigestMemo", "default_cache_dir", "file_digest", "key_of"]
