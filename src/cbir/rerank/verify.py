"""Spatial-verification re-ranking of a query's top K (pure functions: scores and inlier counts in).

The top K of a base ranking (scores s, any re-ranking) are verified geometrically
(:func:`cbir.local.verify.verify_candidates`: inlier counts n); an image is *verified* when
n >= ``min_inliers``. Verification is strict (views that differ much rarely verify) and precise
(a verified pair almost always shows the same object), so it is used two ways:

1. **Order** (:func:`combine_scores`, :func:`apply_order`): the verified images move up. With
   B = max(s) - min(s) + 1 over the query's row (larger than any score gap) and v = [n >= t]:

   - ``"first"``:   s' = s + B v                 (verified first, in the base order)
   - ``"inliers"``: s' = s + B v (1 + n)         (verified first, by inlier count, ties by s)
   - ``"add"``:     s' = s + w v min(1, n / c)   (a bonus of at most ``weight`` w, full at
     ``saturation`` c inliers: a soft rule that a high global score can still beat)
   - ``"none"``:    s' = s

   Images outside the top K keep s (s' >= s, so nothing below K moves above a verified image).

2. **Verified query expansion** (:func:`verified_expansion`, :func:`expand_queries`): the query
   vector plus its verified images' vectors, ``q' = l2(q + sum_i w_i x_i)`` over the verified
   images of the top K (at most ``expand_max``, the best by inliers), w_i = 1 (``"one"``), or
   min(1, n_i / c) (``"inliers"``); the expanded query then goes through the usual re-ranking
   (QE, DBA, diffusion), so verified photos also seed those. This is average query expansion
   (Chum et al. ICCV'07) restricted to spatially verified images, as in the original AQE, which
   expanded only with verified results.

Which combination ships: ``benchmarks/verify_rerank.py`` (chosen on one shared set, reported on
the other); the defaults of :class:`VerifyParams` are its choice.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..linalg import l2_normalize
from ..schema import MAX_NEIGHBOURS, Bool, Float, Int, Schema

__all__ = ["VerifyParams", "verified_mask", "combine_scores", "apply_order", "verified_expansion",
           "expansion_weights", "expand_queries"]


class VerifyParams(Schema):
    """Spatial-verification re-ranking: ``k`` images verified per query; verified iff inliers >=
    ``min_inliers``; ``order`` rule (``weight``, ``saturation`` for "add"); verified query
    expansion (``expand``, at most ``expand_max`` images, 0 = all, weights ``expand_weight``).

    A strict schema (:class:`cbir.schema.Schema`: exact types, unknown keys refused, one-line
    :class:`cbir.schema.SchemaError` naming the field); it is the ``verify`` field of
    :class:`cbir.rerank.compose.Rerank` and of a recipe's ``rerank``."""

    k: Int(ge=1, le=MAX_NEIGHBOURS) = 100
    min_inliers: Int(ge=1, le=1_000_000) = 20
    order: Literal["none", "first", "inliers", "add"] = "first"
    weight: Float(ge=0.0, le=1e6) = 0.1
    saturation: Float(gt=0.0, le=1e6) = 50.0
    expand: Bool = True
    expand_max: Int(ge=0, le=MAX_NEIGHBOURS) = 0
    expand_weight: Literal["one", "inliers"] = "one"


def verified_mask(inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """inliers (...,) -> bool (...,): n >= min_inliers."""
    return np.asarray(inliers) >= int(min_inliers)


def combine_scores(scores: np.ndarray, inliers: np.ndarray, params: VerifyParams,
                   span: np.ndarray | float | None = None) -> np.ndarray:
    """New scores s' of verified candidates (module docstring, rule ``params.order``).

    scores, inliers: (K,) or (nq, K), the same shape. ``span``: B per row ((nq,) or a number);
    default max(s) - min(s) + 1 of each row of ``scores`` (pass the whole row's B when ``scores``
    are only its top K). Returns float64 of the same shape.
    """
    s = np.asarray(scores, dtype=np.float64)
    n = np.asarray(inliers, dtype=np.float64)
    if s.shape != n.shape:
        raise ValueError(f"scores {s.shape} and inlier counts {n.shape} must have the same shape")
    v = verified_mask(n, params.min_inliers).astype(np.float64)
    if params.order == "none" or s.size == 0:
        return s.copy()
    if params.order == "add":
        return s + params.weight * v * np.minimum(1.0, n / params.saturation)
    if span is None:
        span = s.max(axis=-1) - s.min(axis=-1) + 1.0
    b = np.asarray(span, dtype=np.float64)
    if b.ndim:
        b = b[..., None]
    if params.order == "first":
        return s + b * v
    return s + b * v * (1.0 + n)  # "inliers"


def apply_order(scores: np.ndarray, top: np.ndarray, inliers: np.ndarray, params: VerifyParams) -> np.ndarray:
    """Full score rows with each query's verified top K moved up.

    scores (nq, n), top (nq, K) column indices (the verified candidates), inliers (nq, K) ->
    (nq, n) float64: :func:`combine_scores` on the top K with B of the whole row; other columns unchanged.
    """
    s = np.array(scores, dtype=np.float64)
    top = np.asarray(top, dtype=np.int64)
    if s.ndim != 2 or top.shape != np.shape(inliers) or top.shape[0] != s.shape[0]:
        raise ValueError(f"scores {s.shape}, top {top.shape} and inliers {np.shape(inliers)} do not fit")
    if top.size == 0:
        return s
    span = s.max(axis=1) - s.min(axis=1) + 1.0
    rows = np.arange(s.shape[0])[:, None]
    s[rows, top] = combine_scores(s[rows, top], inliers, params, span)
    return s


def expansion_weights(inliers: np.ndarray, params: VerifyParams) -> np.ndarray:
    """Weights (K,) of the top K in the expansion: 0 for unverified and beyond ``expand_max`` (the
    most inliers kept, ties by position), else 1 or min(1, n / saturation)."""
    n = np.asarray(inliers, dtype=np.float64)
    v = verified_mask(n, params.min_inliers)
    if params.expand_max and v.sum() > params.expand_max:
        order = np.lexsort((np.arange(len(n)), -n))  # most inliers first, then the earlier position
        keep = np.zeros(len(n), dtype=bool)
        keep[[i for i in order if v[i]][: params.expand_max]] = True
        v = keep
    w = np.ones_like(n) if params.expand_weight == "one" else np.minimum(1.0, n / params.saturation)
    return np.where(v, w, 0.0)


def verified_expansion(q: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """q' = l2(q + sum_i w_i x_i): q (D,), rows (m, D) the verified images' vectors, weights (m,)."""
    q = np.asarray(q, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, q.shape[0])
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    if w.shape[0] != rows.shape[0]:
        raise ValueError(f"{w.shape[0]} weights for {rows.shape[0]} rows")
    return l2_normalize((q + w @ rows)[None])[0]


def expand_queries(q: np.ndarray, db: np.ndarray, top: np.ndarray, inliers: np.ndarray,
                   params: VerifyParams) -> np.ndarray:
    """Every query expanded with its verified top K: q (nq, D), db (n, D), top / inliers (nq, K)
    -> (nq, D) float32, L2-normalised (a query with no verified image: l2(q))."""
    q = np.asarray(q, dtype=np.float32)
    top = np.asarray(top, dtype=np.int64)
    out = np.empty_like(q)
    for i in range(q.shape[0]):
        w = expansion_weights(inliers[i], params)
        sel = np.flatnonzero(w)
        out[i] = verified_expansion(q[i], np.asarray(db[top[i, sel]]), w[sel])
    return out
