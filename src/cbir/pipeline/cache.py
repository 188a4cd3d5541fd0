"""Where the pipeline keeps descriptors: the per-image extraction cache of :mod:`cbir.cache`.

:func:`cbir.pipeline.describe` with ``cache_dir=DIR`` reads and writes the store of its (model,
weights, settings) key under ``DIR`` (:class:`cbir.cache.describe.DescriptorCache`): every image
is named by its file contents and crop box, so any benchmark, `cbir tune` set, index or
`cbir extract` run with the same model and settings shares the descriptors, and a second run
describes nothing. The key (:mod:`cbir.cache.identity`): the model (a model or weights file by its
SHA-256), the pooling and its parameters, the resolved extraction settings (image size, scales,
precision, backend, device type, decoder) and ``EXTRACTION_VERSION`` (bumped when the numbers of
extraction change), never the paths, modification times or the rest of cbir's source code.
"""

from __future__ import annotations

from ..cache.describe import DescriptorCache
from ..cache.digest import default_cache_dir

__all__ = ["DescriptorCache", "default_cache_dir"]
