"""Build an index from image files: describe them with a model, add them, build the search structure."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .embed import model_settings, source_of
from .index import Index

if TYPE_CHECKING:
    from ..descriptors import Descriptors

from ..extraction.images import IMAGE_EXTENSIONS as IMAGE_SUFFIXES  # one list for all of cbir


def list_images(paths: Sequence[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None) -> list[Path]:
    """The photos of ``paths`` by the rule of :mod:`cbir.collection` (:func:`~cbir.collection.list_photos`),
    absolute; FileNotFoundError for a missing one."""
    from ..collection import list_photos

    return [f.resolve() for f in list_photos(paths, exclude).files]


def build_index(
    files: Sequence[str | os.PathLike[str]],
    *,
    model: str = "efficientnet_lite0",
    pooling: str = "gem",  # NAME[:key=value,...]
    weights: str = "default",
    imsize: int | None = 1024,
    scales: Sequence[float] = (1.0, 2 ** -0.5, 0.5),
    kind: str = "exact",
    params: dict[str, Any] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    progress: bool = True,
    first_id: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    stats: Any = None,
) -> tuple[Index, list[dict[str, str]]]:
    """Index of ``files`` described by ``model`` (a backbone name + ``pooling``, or a saved model file).

    Returns (index, failed [{"path", "reason"}] for unreadable images). The search structure is
    built (faiss training included) before returning, so its errors come here. Ids start at
    ``first_id`` (``cbir.index.persist.next_free_id`` of an index this one will replace).
    ``cache_dir``: the extraction cache (:mod:`cbir.cache`): images already described with this
    model and these settings are read from it, the others described and kept; ``stats`` (a
    :class:`cbir.cache.describe.CacheStats`) says how many were described.
    """
    from ..cache.describe import describe_files
    from ..model import ModelSpec

    files = [Path(f).resolve() for f in files]
    if not files:
        raise ValueError("no images to index")
    spec = ModelSpec(model, pooling, weights)
    net = spec.build()
    settings = model_settings(net, source_of(spec, net), imsize, scales)
    from ..device import resolve_device
    from ..extraction.backends import resolve_backend

    # queries are described alike ("auto" on the CPU: ONNX Runtime in fp32)
    settings["precision"] = resolve_backend(resolve_device(device), "auto", precision)[1]
    index = Index(net.dim, kind, params, settings=settings, device=device)
    index.meta.reserve_ids_below(first_id)
    res = describe_files(net, files, spec=spec, cache_dir=cache_dir, imsize=imsize, scales=scales, device=device,
                         precision=precision, stats=stats, batch_size=batch_size, progress=progress)
    if len(res.ok) == 0:
        raise ValueError(f"none of the {len(files)} images could be read (first: {res.failed[0]['reason']})")
    index.add(res.vectors, [str(files[i]) for i in res.ok])
    index.search_vectors(res.vectors[:1], 1)  # trains / builds faiss structures now
    return index, res.failed


def index_from_descriptors(
    features: "str | os.PathLike[str] | Descriptors",
    *,
    kind: str = "exact",
    params: dict[str, Any] | None = None,
    device: str = "auto",
    first_id: int = 0,
) -> Index:
    """Index of the descriptors of a ``cbir extract`` folder (or of a
    :class:`cbir.descriptors.Descriptors` whose meta records the same), without describing anything again.

    The folder's ``meta.json`` gives each id's image path (``paths``), how to rebuild the model for
    query images (``source``) and the extraction settings (``imsize``, ``scales``). ValueError when it
    lacks the paths (written by an older cbir) or holds no descriptor. Ids start at ``first_id``.
    """
    paths, vectors, meta = descriptors_of_paths(features)
    if len(paths) == 0:
        where = features if isinstance(features, (str, os.PathLike)) else "the descriptors"
        raise ValueError(f"{where} holds no descriptor")
    settings = {k: meta[k] for k in ("model", "weights", "pooling", "pooling_params", "whitening") if k in meta}
    if meta.get("precision") in ("fp32", "bf16"):
        settings["precision"] = meta["precision"]
    settings.update(source=dict(meta.get("source") or {}), imsize=meta.get("imsize"),
                    scales=[float(s) for s in meta.get("scales") or (1.0,)])
    if isinstance(features, (str, os.PathLike)):
        settings["features"] = str(Path(features).resolve())
    index = Index(vectors.shape[1], kind, params, settings=settings, device=device)
    index.meta.reserve_ids_below(first_id)
    index.add(vectors, [str(p) for p in paths])
    index.search_vectors(vectors[:1], 1)  # trains / builds faiss structures now
    return index


@dataclass
class AddPlan:
    """What an add does with each file named: ``todo`` (to describe), ``already`` ({path: id}, indexed
    at that path), ``copies`` ({path: id}: the same bytes as indexed image ``id`` at another path,
    :mod:`cbir.index.duplicates`), ``repeats`` ({path: the first file named with the same path or
    the same bytes}: described once)."""

    todo: list[Path] = field(default_factory=list)
    already: dict[Path, int] = field(default_factory=dict)
    copies: dict[Path, int] = field(default_factory=dict)
    repeats: dict[Path, Path] = field(default_factory=dict)


def plan_add(index: Index, files: Sequence[str | os.PathLike[str]], *, update: bool = False,
             digest: Any = None) -> AddPlan:
    """Which of ``files`` to describe for an add (:class:`AddPlan`).

    A file named twice, or holding the same bytes as one named before it, is described once; a file
    indexed at its path is skipped unless ``update``; a file at a new path holding the bytes of an
    indexed image is that image (:func:`cbir.index.duplicates.indexed_copies`, the service's rule):
    skipped, never a new id. ``digest``: the file hash (default sha256 of the bytes; a
    :class:`cbir.cache.digest.DigestMemo` remembers it). A file that cannot be read is left in
    ``todo`` (describing it reports why).
    """
    from .duplicates import content_of, indexed_copies

    plan = AddPlan()
    seen: set[Path] = set()
    first_of: dict[str, Path] = {}
    content: dict[Path, tuple[str, int]] = {}
    for f in (Path(f).resolve() for f in files):
        if f in seen:
            plan.repeats[f] = f
            continue
        seen.add(f)
        known = index.id_of_path(str(f))
        if known is not None:
            if update:
                plan.todo.append(f)
            else:
                plan.already[f] = known
            continue
        got = content_of(f, digest)
        if got is not None:
            if got[0] in first_of:
                plan.repeats[f] = first_of[got[0]]
                continue
            first_of[got[0]] = f
            content[f] = got
        plan.todo.append(f)
    if content:
        ids = indexed_copies(index, dict(content.values()), digest=digest)
        plan.copies = {f: ids[c[0]] for f, c in content.items() if c[0] in ids}
        plan.todo = [f for f in plan.todo if f not in plan.copies]
    return plan


def add_or_update(index: Index, paths: Sequence[str | os.PathLike[str]], vectors: np.ndarray, *,
                  update: bool = False) -> dict[str, int]:
    """Add each (path, vector) not in the index; replace the vector of an indexed path when
    ``update``, else leave it (counted as ``present``). Returns {"added", "updated", "present"}."""
    vectors = np.asarray(vectors, dtype=np.float32)
    new_paths, new_vecs, updated, present = [], [], 0, 0
    for path, v in zip(paths, vectors):
        current = index.id_of_path(str(path))
        if current is None:
            new_paths.append(str(path))
            new_vecs.append(v)
        elif update:
            index.update(current, v)
            updated += 1
        else:
            present += 1
    if new_paths:
        index.add(np.stack(new_vecs), new_paths)
    return {"added": len(new_paths), "updated": updated, "present": present}


#: How far from 1 the L2 norm of a stored descriptor may be (cbir extract writes unit vectors; float16
#: storage keeps them within ~1e-3). A row outside is refused rather than re-normalised: a norm of
#: 1000 or 0 means a damaged file or vectors made elsewhere, and silently fixing it would hide that.
NORM_TOLERANCE = 0.05


def check_rows(ids: Sequence[str], vectors: np.ndarray, where: str) -> None:
    """ValueError naming the ids of rows that are not finite or whose L2 norm is not ~1
    (``|norm - 1| > NORM_TOLERANCE``): in an inner-product index such a row outranks, or never
    reaches, every real match."""
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
    for mask, what in ((~finite, "NaN or infinite values"),
                       (finite & (np.abs(norms - 1.0) > NORM_TOLERANCE), "an L2 norm far from 1")):
        bad = np.flatnonzero(mask)
        if bad.size:
            shown = ", ".join(f"{ids[i]!r}" + (f" (norm {norms[i]:.3g})" if what.startswith("an") else "")
                              for i in bad[:5]) + (", ..." if bad.size > 5 else "")
            raise ValueError(f"{where}: {bad.size} descriptor(s) with {what}: {shown}; `cbir extract` writes "
                             "finite unit vectors: these are damaged or made elsewhere (extract those images "
                             "again, or L2-normalise them with cbir.linalg.l2_normalize)")


def descriptors_of_paths(features: "str | os.PathLike[str] | Descriptors"
                         ) -> tuple[list[Path], np.ndarray, dict[str, Any]]:
    """(image paths, vectors, settings) of a ``cbir extract`` folder or of Descriptors in memory (see
    :func:`index_from_descriptors`); every row checked by :func:`check_rows` (ValueError naming the bad ids)."""
    from ..descriptors import Descriptors

    desc = features if isinstance(features, Descriptors) else Descriptors.load(features)
    if isinstance(features, Descriptors):
        features = "the descriptors"
    paths = desc.meta.get("paths")
    if not isinstance(paths, dict):
        raise ValueError(f"{features} does not record the image paths of its descriptors (an older `cbir extract`); "
                         "run `cbir extract` again, or give the images")
    missing = next((i for i in desc.ids if i not in paths), None)
    if missing is not None:
        raise ValueError(f"{features}: no image path recorded for id {missing!r}")
    vectors = np.asarray(desc.vectors, np.float32)
    check_rows(desc.ids, vectors, str(features))
    return [Path(paths[i]).resolve() for i in desc.ids], vectors, dict(desc.meta)
