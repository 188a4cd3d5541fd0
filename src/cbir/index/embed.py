"""Turn query images into descriptors with exactly the settings that made an index's descriptors.

An index built from images stores in its settings how its model was made (``source``: a model
name + pooling + weights, or a saved model file) and the extraction settings (``imsize``,
``scales``). :class:`QueryEncoder` rebuilds that model once and describes query images with it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .index import IncompatibleDescriptorError, compat_mismatch

Box = tuple[float, float, float, float]


def model_settings(model: Any, source: dict[str, Any], imsize: int | None, scales: Sequence[float]) -> dict[str, Any]:
    """Index settings for descriptors made by ``model`` (its ``describe()``) + how to rebuild it + extraction."""
    out = dict(model.describe())
    out.update(source=dict(source), imsize=imsize, scales=[float(s) for s in scales])
    return out


def build_model_from_source(source: dict[str, Any]):
    """The RetrievalNet described by an index's ``source`` settings (a file, or names + weights)."""
    from ..model import build_model, load_model

    if source.get("file"):
        return load_model(source["file"])
    if not source.get("model"):
        raise ValueError("the index does not record which model made its descriptors; it cannot describe query "
                         "images (search it with descriptors instead)")
    return build_model(source["model"], pooling=source.get("pooling", "gem"), weights=source.get("weights", "default"),
                       **dict(source.get("pooling_kw") or {}))


def source_of(spec: Any, model: Any) -> dict[str, Any]:
    """How to rebuild the model of a :class:`cbir.model.ModelSpec`: a saved model file, or names + weights."""
    from ..model import parse_pooling

    if spec.is_file:
        return {"file": str(Path(spec.model).resolve())}
    w = spec.weights
    if w not in ("default", "imagenet", "hub", "none"):
        w = str(Path(w).resolve())
    return {"model": spec.model, "pooling": parse_pooling(spec.pooling)[0], "weights": w,
            "pooling_kw": dict(model.config.get("pooling_kw", {}))}


class QueryEncoder:
    """Describes query images like the index's images were described. Loads the model once; thread-safe."""

    def __init__(self, settings: dict[str, Any], *, device: str = "auto", model: Any = None) -> None:
        self.settings = dict(settings)
        self.device = device
        self.imsize = settings.get("imsize", 1024)
        self.scales = tuple(settings.get("scales") or (1.0,))
        self.precision = str(settings.get("precision") or "auto")  # as the index's images were described
        self.model = model if model is not None else build_model_from_source(dict(settings.get("source") or {}))
        made = dict(self.model.describe())
        bad = compat_mismatch(self.settings, made)
        if bad:
            raise IncompatibleDescriptorError(
                "the model rebuilt for queries differs from the one that made the index (" + "; ".join(bad) + ")"
            )
        self.query_settings = made
        self._lock = threading.Lock()  # one forward pass at a time: torch already uses every core per pass

    def encode(self, path: str | os.PathLike[str] | bytes, bbox: Box | None = None) -> np.ndarray:
        """(D,) L2-normalised descriptor of the image (a file, or its bytes in memory), cropped to ``bbox``.

        ``bbox`` is (x1, y1, x2, y2) in the image's pixels. Raises cbir.extract.ImageError naming the
        file when it cannot be read.
        """
        from ..extract import extract

        with self._lock:
            res = extract(self.model, [path], imsize=self.imsize, scales=self.scales, bboxes=[bbox],
                          device=self.device, workers=0, batch_size=1, progress=False, strict=True,
                          precision=self.precision)
        return res.vectors[0]


#: How ``cbir search`` describes a query: ``auto`` = the index's exported network through ONNX Runtime
#: when the device is the CPU (no torch import), else torch; ``onnxruntime`` / ``torch`` force one.
ENCODERS = ("auto", "onnxruntime", "torch")


def query_encoder(settings: dict[str, Any], index_dir: str | os.PathLike[str] | None, *, device: str = "auto",
                  encoder: str = "auto", check_images: Sequence[Any] = (), log: Any = None) -> Any:
    """An object with ``encode(path|bytes, bbox) -> (D,)`` for queries of the index with ``settings``
    (saved in ``index_dir``).

    ``encoder="auto"`` on a CPU (``device`` auto or cpu): the index's exported network
    (:mod:`cbir.index.onnx_query`) run by ONNX Runtime, without importing torch; an index without
    a current export gets one now (exported from the torch network, checked on ``check_images``:
    real photos, e.g. indexed ones and the query, and saved), and falls back to torch when the
    check fails. ``"torch"``: :class:`QueryEncoder`. ``log(text)`` receives one line when an
    export is made or refused.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    on_cpu = str(device) in ("auto", "cpu")
    if encoder == "torch" or (encoder == "auto" and (not on_cpu or index_dir is None)):
        return QueryEncoder(settings, device=device)
    if encoder == "onnxruntime" and not on_cpu:
        raise ValueError(f"the onnxruntime encoder runs on the CPU (got --device {device})")
    from .onnx_query import OnnxQueryEncoder, ensure_query_model, load_query_model

    imsize, scales = settings.get("imsize", 1024), tuple(settings.get("scales") or (1.0,))
    model = load_query_model(index_dir, settings) if index_dir is not None else None
    if model is not None:
        fast = OnnxQueryEncoder(model, imsize=imsize, scales=scales)
        try:
            fast.session  # noqa: B018 (a damaged graph shows here, not at the first query)
            return fast
        except Exception as exc:  # a damaged file: export again below
            if log is not None:
                log(f"query network for ONNX Runtime: not usable ({type(exc).__name__}: {exc}); exporting again")
            Path(model.source).unlink(missing_ok=True) if model.source is not None else None
    torch_encoder = QueryEncoder(settings, device="cpu")
    model, what = ensure_query_model(index_dir, settings, lambda: torch_encoder.model, check_images=check_images)
    if log is not None:
        log(f"query network for ONNX Runtime: {what}")
    if model is None:
        if encoder == "onnxruntime":
            raise ValueError(f"no exported query network for {index_dir}: {what}")
        return torch_encoder
    return OnnxQueryEncoder(model, imsize=imsize, scales=scales)


def export_for_index(index_dir: str | os.PathLike[str], settings: dict[str, Any], check_images: Sequence[Any],
                     model: Any = None) -> str:
    """``cbir index build``: export the index's network for torch-free queries (checked on
    ``check_images``, up to a few indexed photos) unless a current export is there; one line saying
    what was done (or why it was not)."""
    from .onnx_query import ensure_query_model

    _, what = ensure_query_model(index_dir, settings,
                                 lambda: model if model is not None else build_model_from_source(
                                     dict(settings.get("source") or {})),
                                 check_images=check_images)
    return what


def describe_for_index(settings: dict[str, Any], paths: Sequence[str | os.PathLike[str]], *, device: str = "auto",
                       cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
                       ) -> tuple[Any, dict[str, Any]]:
    """(ExtractResult, the model's description) of ``paths`` described like the images of the index
    with ``settings`` (its ``source`` model, image size and scales), through the extraction cache
    under ``cache_dir`` when given (the network is built only if some image is not there)."""
    from ..cache.describe import DescriptorCache, LazyNet, extract_with_cache

    source = dict(settings.get("source") or {})
    imsize, scales = settings.get("imsize"), tuple(settings.get("scales") or (1.0,))
    precision = str(settings.get("precision") or "auto")
    lazy = LazyNet(lambda: build_model_from_source(source))
    cache = None
    if cache_dir is not None and source and str(settings.get("pooling", "")) != "bow":
        cache = DescriptorCache.for_source(source, imsize=imsize, scales=scales, device=device, precision=precision,
                                           root=cache_dir)
    try:
        res = extract_with_cache(lazy, list(paths), cache=cache, imsize=imsize, scales=scales, device=device,
                                 precision=precision, progress=progress)
        about = lazy.net.describe() if lazy.net is not None else dict((cache.store.about if cache else None) or {})
    finally:
        if cache is not None:
            cache.close()
    return res, about
