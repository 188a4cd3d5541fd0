"""Descriptor extraction: the public names, re-exported from the modules of :mod:`cbir.extraction`.

- images, crop boxes, extensions, minimum side: :mod:`cbir.extraction.images`
- device and precision: :mod:`cbir.device`; batches: :mod:`cbir.extraction.batching`
- the loop and the scale combination: :mod:`cbir.extraction.loop`
- BoW codebooks: :mod:`cbir.extraction.bow`
- the resumable folder job (sharded store): :mod:`cbir.extraction.job`; on Ray: :mod:`cbir.extraction.ray_engine`
"""

from __future__ import annotations

import sys

from .device import cpu_has_native_bf16, resolve_device, resolve_precision
from .extraction.bow import fit_bow, load_codebook, save_codebook
from .extraction.images import (IMAGE_EXTENSIONS, MIN_SIDE, Box, ImageError, clip_box, image_size, image_tensor,
                                is_image_file, load_image, parse_bbox, resized_size, scaled_size)
from .extraction.job import extract_to_dir
from .extraction.loop import DEFAULT_SCALES, ExtractResult, combine_scales, extract, rescale

__all__ = [
    "ImageError", "ExtractResult", "load_image", "image_size", "resized_size", "scaled_size", "image_tensor",
    "combine_scales", "rescale", "extract", "extract_to_dir", "fit_bow", "save_codebook", "load_codebook",
    "DEFAULT_SCALES", "IMAGE_EXTENSIONS", "MIN_SIDE", "Box", "clip_box", "is_image_file", "parse_bbox",
    "resolve_device", "resolve_precision", "cpu_has_native_bf16",
]


class _CallableModule(type(sys.modules[__name__])):  # type: ignore[misc]
    """``cbir.extract`` is this module and, called, :func:`cbir.extraction.loop.extract`: the top-level
    name ``cbir.extract`` stays callable whichever of ``import cbir.extract`` / ``cbir.extract(...)``
    comes first (importing a submodule rebinds the package's attribute to the module)."""

    def __call__(self, *args, **kwargs) -> ExtractResult:
        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
