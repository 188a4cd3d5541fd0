"""Tuple mining and class cleaning on descriptor arrays (no images, no model).

* Diverse hard negatives (Radenović et al., TPAMI 2018): for each query, the images of a random
  pool ranked by similarity to the query, keeping at most one image per cluster and never one of
  the query's own cluster, until ``k`` are found.
* Hard positives: the least similar candidate positive under the current model; or, for mined
  data, by the classical evidence of each pair: the top 1 by inlier count, or a random one of the
  top k (:func:`positive_by_evidence`).
* Class cleaning (for class-labelled data such as Google Landmarks, whose classes hold
  unrelated photos): drop an image whose leave-one-out similarity to its own class is a robust
  outlier, or lower than its mean similarity to another class, see :func:`class_consistency_mask`.

Descriptors are L2-normalised rows, similarity is the dot product.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "mine_diverse_negatives",
    "hardest_positive",
    "evidence_order",
    "positive_by_evidence",
    "leave_one_out_class_similarity",
    "mean_class_similarities",
    "class_consistency_mask",
]


def mine_diverse_negatives(
    query_vecs: np.ndarray,
    pool_vecs: np.ndarray,
    query_clusters: np.ndarray,
    pool_clusters: np.ndarray,
    k: int,
    chunk: int = 256,
) -> np.ndarray:
    """Indices of diverse hard negatives into the pool, (Q, k) int64, -1 where fewer exist.

    query_vecs: (Q, D); pool_vecs: (P, D); query_clusters: (Q,); pool_clusters: (P,).
    For query q the pool is scanned by decreasing ``q·x``; an item is taken when its cluster
    differs from q's and from every cluster taken so far for q. Each row therefore holds at
    most one item per cluster and none of q's cluster; rows are sorted hardest first.
    """
    q = np.asarray(query_vecs, dtype=np.float32)
    x = np.asarray(pool_vecs, dtype=np.float32)
    qc = np.asarray(query_clusters)
    pc = np.asarray(pool_clusters)
    if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"query and pool descriptors must be (Q, D) and (P, D); got {q.shape} and {x.shape}")
    if qc.shape != (len(q),) or pc.shape != (len(x),):
        raise ValueError(f"need one cluster id per query ({len(q)}) and per pool item ({len(x)})")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    out = np.full((len(q), k), -1, dtype=np.int64)
    if k == 0 or len(x) == 0:
        return out
    for start in range(0, len(q), chunk):
        sims = q[start : start + chunk] @ x.T
        order = np.argsort(-sims, axis=1, kind="stable")
        for r, row in enumerate(order):
            qi = start + r
            taken: set = {qc[qi].item()}
            n = 0
            for j in row:
                c = pc[j].item()
                if c in taken:
                    continue
                taken.add(c)
                out[qi, n] = j
                n += 1
                if n == k:
                    break
    return out


def hardest_positive(query_vec: np.ndarray, candidate_vecs: np.ndarray) -> int:
    """Row of ``candidate_vecs`` (C, D) least similar to ``query_vec`` (D,): argmin_c q·x_c."""
    c = np.asarray(candidate_vecs, dtype=np.float32)
    if c.ndim != 2 or len(c) == 0:
        raise ValueError(f"need a non-empty (C, D) array of candidate positives, got shape {c.shape}")
    return int(np.argmin(c @ np.asarray(query_vec, dtype=np.float32)))


def evidence_order(evidence: np.ndarray) -> np.ndarray:
    """Candidates ranked by their evidence, (C,) int64 row order: inlier count descending, then
    shared 3D points descending, then the row (the earlier first). evidence: (C, 2) (inliers, points)."""
    e = np.asarray(evidence, dtype=np.int64).reshape(-1, 2)
    return np.lexsort((np.arange(len(e)), -e[:, 1], -e[:, 0])).astype(np.int64)


def positive_by_evidence(evidence: np.ndarray, k: int, rng: np.random.Generator) -> int:
    """Row of the positive chosen among candidates with ``evidence`` (C, 2): uniformly at random
    among the first min(k, C) of :func:`evidence_order` (k = 1: the top one by inliers; Radenović et
    al., TPAMI'18: "the top 1 by inliers" or "random from the top k")."""
    order = evidence_order(evidence)
    if len(order) == 0:
        raise ValueError("need at least one candidate positive")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = order[: min(int(k), len(order))]
    return int(top[0]) if len(top) == 1 else int(top[rng.integers(len(top))])


def leave_one_out_class_similarity(vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean similarity of each image to the OTHER members of its class, (N,); NaN for singletons.

    ``s_i = (Σ_{j∈c(i), j≠i} x_iᵀx_j) / (n_c − 1) = (x_iᵀ(Σ_{j∈c} x_j) − x_iᵀx_i) / (n_c − 1)``.
    """
    x = np.asarray(vectors, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"need (N, D) vectors and (N,) labels; got {x.shape} and {y.shape}")
    classes, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, inv, x)
    n = counts[inv].astype(np.float64)
    own = (x * sums[inv]).sum(1) - (x * x).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 1, own / (n - 1), np.nan)


def mean_class_similarities(vectors: np.ndarray, labels: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean similarity of every image to every class, (N, C), its own class leave-one-out
    (NaN for a singleton's own class), and the sorted class ids (C,).
    ``m[i, c] = (x_iᵀ Σ_{j∈c} x_j − [c = c(i)]·x_iᵀx_i) / (n_c − [c = c(i)])``."""
    x = np.asarray(vectors, dtype=np.float64)
    y = np.asarray(labels)
    classes, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, inv, x)
    out = np.empty((len(x), len(classes)))
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        m = xs @ sums.T
        n = np.broadcast_to(counts.astype(np.float64), m.shape).copy()
        rows = np.arange(len(xs))
        m[rows, inv[s : s + chunk]] -= (xs * xs).sum(1)
        n[rows, inv[s : s + chunk]] -= 1
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s : s + chunk] = np.where(n > 0, m / np.maximum(n, 1), np.nan)
    return out, classes


def class_consistency_mask(
    vectors: np.ndarray,
    labels: np.ndarray,
    k: float = 3.0,
    min_size: int = 4,
    min_spread: float = 0.02,
    nearest_class: bool = True,
) -> np.ndarray:
    """Keep-mask (N,) bool of the class-cleaning rule.

    For every class c with at least ``min_size`` members, let ``s_i`` be the leave-one-out mean
    similarity of member i to the rest of c (:func:`leave_one_out_class_similarity`) and
    ``MAD_c = median_i |s_i − median(s)|``. Member i is dropped when

    1. ``s_i < median(s) − k · max(1.4826·MAD_c, min_spread)`` — a robust z-score below −k
       (1.4826·MAD estimates σ for Gaussian data; ``min_spread`` keeps a tight class from losing
       members to rounding noise), or
    2. (``nearest_class``) its mean similarity to some other class exceeds ``s_i``: on average it
       looks more like another class than like its own (costs an (N, C) product, chunked).

    Smaller classes are kept whole.
    """
    s = leave_one_out_class_similarity(vectors, labels)
    y = np.asarray(labels)
    keep = np.ones(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < min_size:
            continue
        sc = s[idx]
        med = np.median(sc)
        spread = max(1.4826 * np.median(np.abs(sc - med)), min_spread)
        keep[idx] = sc >= med - k * spread
    if nearest_class:
        m, classes = mean_class_similarities(vectors, y)
        own = np.searchsorted(classes, y)
        other = m.copy()
        other[np.arange(len(y)), own] = -np.inf
        best_other = other.max(axis=1) if len(classes) > 1 else np.full(len(y), -np.inf)
        sizes = np.unique(y, return_counts=True)[1][own]
        keep &= ~((sizes >= min_size) & (best_other > s))
    return keep
