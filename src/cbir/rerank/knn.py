"""Nearest neighbours by inner product, shared by query expansion, DBA and diffusion.

- :func:`topk`: the k best entries of each row of a score matrix (exact, deterministic ties);
- :func:`knn_search`: k nearest database vectors of each query with faiss (exact ``IndexFlatIP``,
  or an inverted file for large databases).
"""

from __future__ import annotations

import numpy as np

from ..evaluation import best_k_at_cut


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of ``scores`` (nq, n), best first -> (values (nq,k), indices (nq,k)).

    Ties go to the lower index, at the cut too: the result is the first k columns of the stable
    descending sort of each row (``np.argsort(-row, kind="stable")``), in O(n) per row.
    """
    scores = np.asarray(scores)
    k = int(min(max(k, 0), scores.shape[1]))
    if k == 0:
        return scores[:, :0], np.zeros((scores.shape[0], 0), dtype=np.int64)
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
        for i in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k):  # ties at the cut
            part[i] = best_k_at_cut(scores[i], k, kth[i])
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, idx, axis=1), idx.astype(np.int64)


def ip_index(base: np.ndarray, *, nlist: int = 0, nprobe: int = 8):
    """A faiss inner-product index holding the rows of base (n, D) float32: exact ``IndexFlatIP``,
    or with ``nlist > 0`` an ``IndexIVFFlat`` (nlist k-means cells, 10 iterations on at most 64
    points per cell: enough for a coarse quantiser; ``nprobe`` cells visited per query)."""
    import faiss

    base = np.ascontiguousarray(base, dtype=np.float32)
    d = base.shape[1]
    if nlist > 0:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, int(nlist), faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        index.cp.max_points_per_centroid = 64
        index.train(base)
        index.add(base)
        index.nprobe = int(nprobe)
    else:
        index = faiss.IndexFlatIP(d)
        index.add(base)
    return index


def knn_search(
    q: np.ndarray, db: np.ndarray, k: int, batch: int = 16384, nlist: int = 0, nprobe: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product k nearest neighbours with faiss -> (sims (nq,k) f32, idx (nq,k) i64).

    Exact (``IndexFlatIP``) by default; ``nlist > 0`` uses an inverted file (``IndexIVFFlat``,
    nlist k-means cells, ``nprobe`` visited) for large databases: approximate, missing
    neighbours are returned as index -1. k is clamped to the database size; queries are searched
    in batches to bound memory.
    """
    db = np.ascontiguousarray(db, dtype=np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"query dimension {q.shape[1]} != database dimension {db.shape[1]}")
    k = int(min(k, db.shape[0]))
    index = ip_index(db, nlist=nlist, nprobe=nprobe)
    sims = np.empty((q.shape[0], k), dtype=np.float32)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    for s in range(0, q.shape[0], batch):
        sims[s : s + batch], idx[s : s + batch] = index.search(q[s : s + batch], k)
    return sims, idx
