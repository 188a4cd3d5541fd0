"""The functions of ``import cbir`` that had no single home: a folder described, an index built from
descriptors in memory. Thin, typed layers over the stages (:mod:`cbir.pipeline`,
:mod:`cbir.cache.describe`, :mod:`cbir.index.build`); no formula lives here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union, overload

if TYPE_CHECKING:
    from .datasets import RetrievalDataset
    from .descriptors import Descriptors
    from .index import Index
    from .model import ModelSpec, RetrievalNet

__all__ = ["build_index", "describe", "describe_images"]

#: What :func:`describe_images` takes: a folder, an image file, or several of them.
Images = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


def describe_images(
    images: Images,
    model: "ModelSpec | RetrievalNet | str | None" = None,
    *,
    imsize: int | None = None,
    scales: Sequence[float] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    backend: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> "Descriptors":
    """One L2-normalised descriptor per image of a folder (recursively) or of a list of files.

    Files are found as ``cbir extract`` finds them (:func:`cbir.collection.collect_images`: hidden
    files skipped; ids are paths relative to the folder without extension, ``a/b`` for
    ``photos/a/b.jpg``, or the bare name of a file given directly). ``model``: a
    :class:`cbir.model.ModelSpec` (default: ``ModelSpec()``, Lite0 + GeM), a backbone name or
    model file, or an in-memory :class:`cbir.model.RetrievalNet`. ``imsize``/``scales`` default to
    the backbone's (:func:`cbir.pipeline.extraction_defaults`). With ``cache_dir`` each image is
    read from / kept in the extraction cache (:mod:`cbir.pipeline.cache`; a ModelSpec only).

    Returns :class:`cbir.descriptors.Descriptors` of the readable images (rows in id order);
    ``failed`` lists the others (``{"path", "reason"}``), and the files of a folder left out as not images. ``meta`` holds what
    :func:`build_index` and ``cbir index build --features`` need: the model's description,
    ``source`` (how to rebuild it for query images), ``imsize``, ``scales``, ``precision`` and
    ``paths`` (id -> absolute path). ValueError when no image could be read.
    """
    import numpy as np

    from .cache.describe import describe_files
    from .collection import collect_images
    from .descriptors import Descriptors
    from .device import resolve_device
    from .extraction.backends import resolve_backend
    from .index.embed import source_of
    from .model import ModelSpec
    from .pipeline.benchmark import extraction_defaults

    names = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    photos = collect_images(names)
    ids, files = photos.ids, photos.files
    if model is None or isinstance(model, (str, os.PathLike)):
        model = ModelSpec() if model is None else ModelSpec(str(model))
    spec = model if isinstance(model, ModelSpec) else None
    net = spec.build() if spec is not None else model
    config = getattr(net, "config", None) or {}
    d_imsize, d_scales = extraction_defaults(None, spec.model if spec is not None else config.get("model"), config)
    imsize = d_imsize if imsize is None else int(imsize)
    scales = tuple(float(s) for s in (d_scales if scales is None else scales))
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales: must be positive numbers (got {scales})")
    res = describe_files(net, files, spec=spec, cache_dir=cache_dir, imsize=imsize, scales=scales, device=device,
                         precision=precision, backend=backend, batch_size=batch_size, progress=progress)
    if len(res.ok) == 0:
        raise ValueError(f"none of the {len(files)} files could be read (first: {res.failed[0]['reason']})")
    ok = [int(i) for i in res.ok]
    source = source_of(spec, net) if spec is not None else {}
    meta = {**net.describe(), "source": source, "imsize": imsize, "scales": list(scales),
            "precision": resolve_backend(resolve_device(device), backend, precision)[1],
            "paths": {ids[i]: str(files[i].resolve()) for i in ok}}
    return Descriptors(ids=[ids[i] for i in ok], vectors=np.asarray(res.vectors, dtype=np.float32), meta=meta,
                       failed=list(res.failed) + [{"path": str(p), "reason": "not an image (by extension)"}
                                                  for p in photos.not_images])


@overload
def describe(source: "RetrievalDataset", model: "ModelSpec | RetrievalNet | str | None" = None,
             **kw: Any) -> "tuple[Descriptors, Descriptors]": ...


@overload
def describe(source: Images, model: "ModelSpec | RetrievalNet | str | None" = None,
             **kw: Any) -> "Descriptors": ...


def describe(source: "RetrievalDataset | Images", model: "ModelSpec | RetrievalNet | str | None" = None,
             **kw: Any) -> "Descriptors | tuple[Descriptors, Descriptors]":
    """Descriptors of a benchmark or of a collection of photos, with ``model`` (default ``ModelSpec()``).

    - a benchmark (:func:`cbir.pipeline.load_benchmark`): ``(queries, database)``, queries cropped
      to their box, through :func:`cbir.pipeline.describe` (same keywords: ``imsize``, ``scales``,
      ``crop``, ``cache_dir``, ...);
    - a folder, an image file or a list of them: one :class:`cbir.descriptors.Descriptors`, through
      :func:`describe_images` (ready for :func:`build_index`).
    """
    from .datasets import RetrievalDataset
    from .model import ModelSpec

    if isinstance(source, RetrievalDataset):
        from .pipeline.describing import describe as describe_benchmark

        return describe_benchmark(source, ModelSpec() if model is None else model, **kw)
    return describe_images(source, model, **kw)


def build_index(
    descriptors: "Descriptors | str | os.PathLike[str]",
    *,
    kind: str = "exact",
    params: dict[str, Any] | None = None,
    device: str = "auto",
) -> "Index":
    """A searchable :class:`cbir.index.Index` of ``descriptors`` (made by :func:`describe_images`,
    or a ``cbir extract`` folder), nothing described again: :func:`cbir.index.build.index_from_descriptors`.

    ``kind``: ``exact`` or a faiss structure (``cbir.index.KINDS``, ``params`` its parameters).
    The index keeps each image's path and how to describe query images like its own; save it with
    ``index.save(folder)``. ValueError when rows are not finite or not L2-normalised, or when the
    descriptors do not record their image paths.
    """
    from .index.build import index_from_descriptors

    if isinstance(descriptors, (str, os.PathLike)):
        descriptors = Path(descriptors)
    return index_from_descriptors(descriptors, kind=kind, params=params, device=device)
