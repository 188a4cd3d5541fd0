"""Searching a saved index with one query, re-ranked by a Rerank object; finding an image by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..rerank.compose import Rerank
from ..rerank.recipe import Recipe


def search_index(index: Any, query: np.ndarray, k: int = 20, rerank: Rerank | Recipe | None = None, *,
                 verifier: Any = None) -> tuple[list, dict]:
    """Top-``k`` hits (:class:`cbir.index.Hit`, best first) of one query descriptor (D,) in a
    :class:`cbir.index.Index`, re-ranked as ``rerank`` says; without re-ranking, the index's own
    search structure. Re-ranking runs on the stored vectors and kNN graph without copying them
    (:meth:`cbir.index.Index.search_rerank`). A :class:`cbir.rerank.recipe.Recipe` with a whitening
    scores every stored vector through it. Returns (hits, applied).

    With ``rerank.verify`` (spatial verification), ``verifier(0, ids)`` gives the inlier counts of
    the query against indexed images by id (:func:`cbir.index.local.index_verifier`); the chain
    is that of :mod:`cbir.rerank.compose` (see :func:`_search_verified`) and each hit of the
    verified top K carries its ``inliers`` (-1: the query's own photo)."""
    q = np.asarray(query, dtype=np.float32).reshape(1, -1)
    verify = getattr(rerank, "verify", None)
    if verify is not None:
        if verifier is None:
            from ..rerank.compose import NEEDS_VERIFIER

            raise ValueError(NEEDS_VERIFIER)
        return _search_verified(index, q, k, rerank, verify, verifier)
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


def _search_verified(index: Any, q: np.ndarray, k: int, rerank: Rerank | Recipe, verify: Any,
                     verifier: Any) -> tuple[list, dict]:
    """The chain of :mod:`cbir.rerank.compose` for one query on an index.

    Whitening or DBA (they change every vector): the whole chain on all stored vectors
    (``rerank.apply`` with the verifier on ids). Otherwise on the stored vectors and graph: the
    index's own search gives the top K (exact, or as approximate as the index is), which are
    verified; the query is expanded with the verified ones (``verify.expand``); the rest of the
    re-ranking (QE, diffusion) runs from q' through :func:`search_index` for the top k + K. In both,
    the verified images are then moved up by ``verify.order`` over the candidates (a verified
    image outside the re-ranked top k + K ranks after those inside it, by its inner product with
    q'). Hit scores are the re-ranking's, without the order's bonus. With an exact index and
    every verified image inside the top k + K, the order is that of ``rerank.apply``.
    """
    from ..index import Hit
    from ..rerank.compose import order_verified, verify_record
    from ..rerank.verify import expansion_weights, verified_expansion

    n = len(index)
    if n == 0:
        return [], {}
    counts: dict[int, int] = {}

    def on_ids(ids: np.ndarray) -> np.ndarray:
        c = np.asarray(verifier(0, ids), dtype=np.int64)
        counts.update(zip((int(i) for i in ids), (int(v) for v in c)))
        return c

    plain = verify.model_copy(update={"order": "none"})
    recipe = rerank if isinstance(rerank, Recipe) else None
    base = recipe.rerank if recipe is not None else rerank
    K = min(int(verify.k), n)
    if (recipe is not None and recipe.spec.method != "none") or base.whiten or base.dba > 1:
        ids, db = index.vectors()
        scores, applied = rerank.with_verify(plain).apply(q, db, lambda _i, rows: on_ids(ids[rows]))
        row = scores[0].astype(np.float64)
        top = np.argsort(-row, kind="stable")[: min(n, k + K)]
        cand = {int(ids[j]): float(row[j]) for j in top}
        where = {int(i): j for j, i in enumerate(ids)}
        for i, c in counts.items():
            if i not in cand and (c >= verify.min_inliers or c < 0):
                cand[i] = float(row[where[i]])
        paths = {h: index.get(h).path for h in cand}
    else:
        s0, ids0 = index.search_vectors(q, K)
        ids0 = ids0[0][ids0[0] >= 0]
        c0 = on_ids(ids0)
        q2 = q[0] / max(float(np.linalg.norm(q[0])), 1e-12)
        if verify.expand:
            w = expansion_weights(c0, verify)
            sel = np.flatnonzero(w)
            if sel.size:
                q2 = verified_expansion(q2, np.stack([index.vector(int(i)) for i in ids0[sel]]), w[sel])
        rest = base.with_verify(None)
        hits, applied = search_index(index, q2, min(n, k + K), rest)
        if recipe is not None:
            applied = {"recipe": {"whitening": {"method": "none"}, "source": recipe.meta.get("file")}, **applied}
        cand = {h.id: h.score for h in hits}
        paths = {h.id: h.path for h in hits}
        low = min(cand.values()) if cand else 0.0
        for i, c in counts.items():
            if i not in cand and (c >= verify.min_inliers or c < 0):
                cand[i] = low - 1.0 + 0.5 * float(index.vector(i) @ q2)
                paths[i] = index.get(i).path
    order_ids = list(cand)
    s = np.asarray([cand[i] for i in order_ids], dtype=np.float64)
    inl = np.asarray([counts.get(i, 0) for i in order_ids], dtype=np.int64)
    final = order_verified(s[None], np.arange(len(s))[None], inl[None], verify)[0] if len(s) else s
    pick = np.argsort(-final, kind="stable")[:k]
    out = [Hit(order_ids[j], paths[order_ids[j]], float(s[j]),
               counts.get(order_ids[j]) if order_ids[j] in counts else None) for j in pick]
    top_counts = np.asarray([list(counts.values())], dtype=np.int64) if counts else np.zeros((1, 0), np.int64)
    record = verify_record(verify, top_counts)
    if hasattr(verifier, "stats"):
        record.update(verifier.stats())
    applied = {k2: v for k2, v in applied.items() if k2 != "verify"}
    return out, {**applied, "verify": record}


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
