"""Candidate pairs from the global descriptors: each photo's k nearest neighbours, deduplicated.

With L2-normalised rows x_i, the similarity is s_ij = x_i . x_j; photo i's neighbours are the k
largest s_ij over j != i (ties to the lower index, :func:`cbir.rerank.knn.topk`). The candidate
pairs are the unordered pairs {i, j} with j among i's k nearest or i among j's, listed once as
(min, max), sorted; a photo pairs with at most k + (the photos that name it) others, so the count
is between N k / 2 and N k. This is the "global kNN" step of mining (Radenović et al., TPAMI'18:
candidates from retrieval, then spatial verification).
"""

from __future__ import annotations

import numpy as np

__all__ = ["knn_pairs"]

#: Rows of the similarity matrix computed at once.
CHUNK_ROWS = 1024


def knn_pairs(vectors: np.ndarray, k: int, valid: np.ndarray | None = None,
              chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (P, 2) int64 with pairs[:, 0] < pairs[:, 1], sorted; similarity (P,) float32).

    vectors: (N, D) L2-normalised rows; ``valid``: (N,) bool, rows that take part (others, e.g.
    unreadable photos, are never paired); k is capped at the number of valid photos minus one.
    """
    from ..rerank.knn import topk

    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be an (N, D) array, got shape {x.shape}")
    n = x.shape[0]
    ok = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if ok.shape != (n,):
        raise ValueError(f"valid must be one flag per row ({n}), got shape {ok.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = np.flatnonzero(ok)
    kk = min(int(k), len(rows) - 1)
    if kk < 1:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    sub = x[rows]
    found: list[np.ndarray] = []
    for start in range(0, len(rows), chunk_rows):
        s = sub[start:start + chunk_rows] @ sub.T
        s[np.arange(s.shape[0]), start + np.arange(s.shape[0])] = -np.inf  # never itself
        _, idx = topk(s, kk)
        a = np.repeat(start + np.arange(s.shape[0]), kk)
        found.append(np.stack([a, idx.reshape(-1)], axis=1))
    local = np.concatenate(found)
    local = np.sort(local, axis=1)
    local = np.unique(local, axis=0)  # sorted rows, each unordered pair once
    pairs = rows[local].astype(np.int64)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs = pairs[order]
    sims = np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]]).astype(np.float32)
    return pairs, sims
