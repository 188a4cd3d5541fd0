"""Searching a saved index with one query, re-ranked by a Rerank object; finding an image by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..rerank.compose import Rerank
from ..rerank.recipe import Recipe


def search_index(index: Any, query: np.ndarray, k: int = 20, rerank: Rerank | Recipe | None = None) -> tuple[list, dict]:
    """Top-``k`` hits (:class:`cbir.index.Hit`, best first) of one query descriptor (D,) in a
    :class:`cbir.index.Index`, re-ranked as ``rerank`` says; without re-ranking, the index's own
    search structure. Re-ranking runs on the stored vectors and kNN graph without copying them
    (:meth:`cbir.index.Index.search_rerank`). A :class:`cbir.rerank.recipe.Recipe` with a whitening
    scores every stored vector through it. Returns (hits, applied)."""
    q = np.asarray(query, dtype=np.float32).reshape(1, -1)
    if isinstance(rerank, Recipe):
        if rerank.spec.method != "none":  # a whitening changes every vector: all of them through the recipe
            from ..index import Hit

            ids, db = index.vectors()
            scores, applied = rerank.apply(q, db)
            order = np.argsort(-scores[0], kind="stable")[:k]
            return [Hit(int(ids[i]), index.get(int(ids[i])).path, float(scores[0, i])) for i in order], applied
        hits, applied = search_index(index, query, k, rerank.rerank)  # on the stored vectors and graph
        return hits, {"recipe": {"whitening": {"method": "none"}, "source": rerank.meta.get("file")}, **applied}
    if rerank is None or rerank.is_off():
        return index.search(q, k)[0], {}
    hits, applied = index.search_rerank(q, k, rerank)
    return hits[0], applied


def find_image(index: Any, name: str) -> int:
    """The id of an indexed image named by its id number, its path, or a `cbir extract` id
    (the path without extension, relative to a folder: ``a/b`` for ``.../photos/a/b.jpg``).
    KeyError when none matches, ValueError when a name matches several images."""
    text = str(name).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    direct = index.id_of_path(str(Path(text).resolve())) if Path(text).exists() else None
    if direct is not None:
        return direct
    stem = text[:-len(Path(text).suffix)] if Path(text).suffix else text
    found = [r.id for r in index.records() if Path(r.path).with_suffix("").as_posix().endswith("/" + stem.lstrip("/"))
             or Path(r.path).with_suffix("").as_posix() == stem]
    if not found:
        raise KeyError(f"no indexed image is named {text!r} (give an id number, a path, or a `cbir extract` id)")
    if len(found) > 1:
        raise ValueError(f"{len(found)} indexed images are named {text!r} (ids {found[:5]}); give more of the path")
    return found[0]
