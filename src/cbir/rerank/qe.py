"""Query expansion and database-side augmentation, batched over queries.

All inputs are L2-normalised row vectors; similarity is the inner product.

- average QE (Chum et al. ICCV'07, the "AQE" of later work): ``q' = l2(q + sum_{i<k} x_(i))``
  over the query's top-k database vectors ``x_(i)``;
- alpha-weighted QE (Radenovic et al. TPAMI'18): ``q' = l2(q + sum_{i<k} max(s_i,0)^alpha x_(i))``
  with ``s_i = q . x_(i)``, query weight 1 (alpha = 0 is average QE);
- DBA, database-side augmentation (Arandjelovic & Zisserman CVPR'12; alpha-weighted form of
  Radenovic et al.): every database vector replaced by ``l2(sum_{i<k} max(s_i,0)^alpha x_(i))``
  over its own top-k neighbours, the vector itself (s = 1) being the first of them.
"""

from __future__ import annotations

import numpy as np

from ..linalg import l2_normalize
from .knn import knn_search, topk


def _as_f32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N x D), got shape {x.shape}")
    return x


def _check_pair(q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, db = _as_f32(q, "queries"), _as_f32(db, "database")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"query dimension {q.shape[1]} != database dimension {db.shape[1]}")
    return q, db


def _weighted_sum(db: np.ndarray, idx: np.ndarray, w: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``out[r] = sum_j w[r,j] db[idx[r,j]]`` -> (len(idx), D), in row chunks to bound memory."""
    out = np.empty((idx.shape[0], db.shape[1]), dtype=np.float32)
    for s in range(0, idx.shape[0], chunk):
        e = s + chunk
        out[s:e] = np.einsum("rk,rkd->rd", w[s:e], db[idx[s:e]], dtype=np.float32)
    return out


def alpha_qe(
    q: np.ndarray, db: np.ndarray, k: int, alpha: float = 3.0, scores: np.ndarray | None = None
) -> np.ndarray:
    """alpha-weighted query expansion: ``l2(q + sum_{i<k} max(s_i,0)^alpha x_(i))``.

    q (nq, D), db (n, D) L2-normalised; ``scores`` (nq, n) = q @ db.T if already computed.
    Returns the expanded queries (nq, D) float32, L2-normalised. k = 0 returns q unchanged.
    """
    q, db = _check_pair(q, db)
    if k <= 0:
        return q.copy()
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha-QE exponent must be a finite number >= 0, got {alpha}")
    if scores is None:
        scores = q @ db.T
    s, idx = topk(scores, k)
    w = np.maximum(s, 0.0).astype(np.float32) ** np.float32(alpha)
    return l2_normalize(q + _weighted_sum(db, idx, w))


def average_qe(q: np.ndarray, db: np.ndarray, k: int, scores: np.ndarray | None = None) -> np.ndarray:
    """Average query expansion: ``l2(q + sum_{i<k} x_(i))`` (the mean of q and its top-k, then L2)."""
    q, db = _check_pair(q, db)
    if k <= 0:
        return q.copy()
    if scores is None:
        scores = q @ db.T
    _, idx = topk(scores, k)
    return l2_normalize(q + _weighted_sum(db, idx, np.ones(idx.shape, dtype=np.float32)))


def dba(db: np.ndarray, k: int, alpha: float = 0.0, batch: int = 4096) -> np.ndarray:
    """Database-side augmentation: each row -> ``l2(sum_{i<k} max(s_i,0)^alpha x_(i))``.

    The neighbours (found with an exact faiss inner-product search) include the row itself, so
    k = 1 returns db unchanged and alpha = 0 is plain averaging over the top-k. (n, D) -> (n, D).
    """
    db = _as_f32(db, "database")
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"DBA exponent must be a finite number >= 0, got {alpha}")
    if k <= 1:
        return db.copy()
    s, idx = knn_search(db, db, k, batch=batch)
    w = np.maximum(s, 0.0) ** np.float32(alpha) if alpha else np.ones_like(s)
    return l2_normalize(_weighted_sum(db, idx, w.astype(np.float32)))
