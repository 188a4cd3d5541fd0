"""Build an index from image files: describe them with a model, add them, build the search structure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .embed import model_settings, source_of
from .index import Index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def list_images(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files named, or found recursively under named folders (sorted, absolute); FileNotFoundError for a missing one."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return [f.resolve() for f in out]


def build_index(
    files: Sequence[str | os.PathLike[str]],
    *,
    model: str = "efficientnet_lite0",
    pooling: str = "gem",
    weights: str = "default",
    imsize: int | str | None = "auto",
    scales: Sequence[float] | None = None,
    kind: str = "exact",
    params: dict[str, Any] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[Index, list[dict[str, str]]]:
    """Index of ``files`` described by ``model`` (a backbone name + ``pooling``, or a saved model file).

    ``imsize="auto"`` / ``scales=None``: the model's default (``cbir.backbones.default_resolution``);
    ``imsize=None``: images are not shrunk.
    Returns (index, failed [{"path", "reason"}] for unreadable images). The search structure is
    built (faiss training included) before returning, so its errors come here.
    """
    from ..backbones import default_resolution
    from ..extract import extract
    from ..model import build_model, load_model

    files = [Path(f).resolve() for f in files]
    if not files:
        raise ValueError("no images to index")
    net = load_model(model) if Path(model).is_file() else build_model(model, pooling=pooling, weights=weights)
    auto_size, auto_scales = default_resolution(net.config.get("model", ""), net.config)
    imsize = auto_size if imsize == "auto" else imsize
    scales = auto_scales if scales is None else tuple(scales)
    settings = model_settings(net, source_of(model, pooling, weights, net), imsize, scales)
    index = Index(net.dim, kind, params, settings=settings, device=device)
    res = extract(net, files, imsize=imsize, scales=tuple(scales), device=device, batch_size=batch_size,
                  progress=progress)
    if len(res.ok) == 0:
        raise ValueError(f"none of the {len(files)} images could be read (first: {res.failed[0]['reason']})")
    index.add(res.vectors, [str(files[i]) for i in res.ok])
    index.search_vectors(res.vectors[:1], 1)  # trains / builds faiss structures now
    return index, res.failed
