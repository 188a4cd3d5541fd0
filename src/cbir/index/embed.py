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
                          device=self.device, workers=0, batch_size=1, progress=False, strict=True)
        return res.vectors[0]
