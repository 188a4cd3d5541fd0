"""Retrieval evaluation: revisitop mAP / mP@k (Easy, Medium, Hard), the original Oxford/Paris
protocol, Google Landmarks v2 retrieval mAP@100, and recall@k.

Everything here is pure numpy over arrays; nothing is read from disk (see ``cbir.datasets``).

Rankings
--------
A *ranking* is an integer array ``ranks`` of shape (nq, K): ``ranks[i, r]`` is the database index
placed at (0-based) position r for query i. (revisitop's own ``compute_map`` takes the transpose,
(K, nq); we use one row per query like every other array in cbir.) K = ndb is a full ranking;
K < ndb is a top-K ranking.

A *score matrix* ``scores`` (nq, ndb), higher = more similar, is turned into a ranking by
:func:`rank_from_scores`: descending score, **ties broken by ascending database index** (a stable
order, so equal scores never make the result depend on the sort algorithm).

What a top-K cut changes
------------------------
With ``top_k=K`` only the K best database images are ranked (``np.argpartition`` + a sort of K
items instead of a full sort of ndb; the result is the same first K positions a full stable sort
gives). A positive ranked below the cut counts as **missed**: it adds nothing to AP, while AP is
still divided by the full number of positives. The positions of the positives inside the cut are
exact (every junk image before them is inside the cut too), so the top-K AP equals the exact AP
minus the terms of the positives below position K: it is a lower bound, and equal to the exact AP
whenever all positives of the query are in the top K. mP@k is exact as long as the top K holds at
least k non-junk images (always so for K >= k + #junk).
"""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)

# Queries per chunk are chosen so that a chunk's (queries x K) work arrays stay near this size.
_CHUNK_ELEMS = 1 << 24


# --------------------------------------------------------------------------------------------
# rankings
# --------------------------------------------------------------------------------------------


def best_k_at_cut(row: np.ndarray, k: int, kth: float) -> np.ndarray:
    """Indices of the ``k`` best entries of ``row`` (n,), whose k-th largest value is ``kth``:
    every index scoring above ``kth``, then the lowest indices scoring exactly ``kth`` (ties at the
    cut go to the lower index). Unsorted."""
    above = np.flatnonzero(row > kth)
    return np.concatenate([above, np.flatnonzero(row == kth)[: k - above.size]])


def rank_from_scores(scores: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Ranking (nq, K) int64 of a score matrix (nq, ndb): descending score, ties by ascending index.

    ``top_k=None`` (or >= ndb) ranks the whole database with one stable sort; otherwise only the
    ``top_k`` best of each row are found (``argpartition``, O(ndb) per query) and sorted, giving
    exactly the first ``top_k`` columns of the full ranking (ties at the cut go to lower indices).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (queries x database), got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    nq, ndb = scores.shape
    if ndb == 0:
        return np.zeros((nq, 0), dtype=np.int64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; a ranking is undefined")
    if top_k is None or top_k >= ndb:
        return np.argsort(-scores, axis=1, kind="stable").astype(np.int64, copy=False)
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    out = np.empty((nq, top_k), dtype=np.int64)
    for i in range(nq):
        row = scores[i]
        cand = best_k_at_cut(row, top_k, -np.partition(-row, top_k - 1)[top_k - 1])
        order = np.lexsort((cand, -row[cand]))  # primary: score desc; secondary: index asc
        out[i] = cand[order]
    return out


# --------------------------------------------------------------------------------------------
# AP and mAP (revisitop / original Oxford protocol)
# --------------------------------------------------------------------------------------------


class MapResult(NamedTuple):
    """``map`` and ``mp`` (one per kappa) are fractions in [0, 1]; ``aps`` (nq,) and ``prs``
    (nq, len(kappas)) are per query, NaN for queries without positives (left out of the means).
    The field order is revisitop's ``(map, aps, pr, prs)``."""

    map: float
    aps: np.ndarray
    mp: np.ndarray
    prs: np.ndarray


def average_precision(pos: np.ndarray, n_pos: int) -> float:
    """Interpolated (trapezoid) AP of one query, as revisitop's ``compute_ap`` / Oxford's compute_ap.cpp.

    ``pos``: sorted 0-based positions of the retrieved positives *after junk images were taken out
    of the ranking*; ``n_pos``: number of positives of the query (missed ones included).
    AP = sum_j ((j / r_j if r_j > 0 else 1) + (j + 1) / (r_j + 1)) / 2 / n_pos, j = 0, 1, ...
    """
    pos = np.asarray(pos, dtype=np.float64)
    if n_pos <= 0:
        return float("nan")
    j = np.arange(pos.size, dtype=np.float64)
    prec0 = np.divide(j, pos, out=np.ones_like(pos), where=pos > 0)
    prec1 = (j + 1.0) / (pos + 1.0)
    return float(np.sum(prec0 + prec1) / 2.0 / n_pos)


def _as_index_array(x: Iterable[int] | None) -> np.ndarray:
    if x is None:
        return np.zeros(0, dtype=np.int64)
    arr = np.asarray(x, dtype=np.int64).reshape(-1)
    return arr


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Iterable[int]]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    top_k: int | None = None,
) -> MapResult:
    """mAP and mP@k over queries, revisitop's definition.

    ``ranks``: an integer ranking (nq, K) (see module doc), or a float score matrix (nq, ndb),
    which is ranked with :func:`rank_from_scores` (``top_k`` applies only then).
    ``gnd``: one dict per query with ``ok`` (positives) and optionally ``junk`` (database indices).

    Per query: the positions of the ok images in the ranking are found; every junk image before a
    positive is taken out of the ranking (a positive at 0-based position p with m junk images
    before it gets position r = p - m); AP is :func:`average_precision` of those positions with
    n_pos = len(ok). mP@k: with 1-based positions P, kq = min(max(P), k) and P@k = #(P <= kq) / kq
    (kq = k when a positive fell below a top-K cut). Queries with no positives get NaN and are
    left out of both means. An image in both ok and junk counts as a positive (as in revisitop).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be a 2-D array (queries x positions), got shape {ranks.shape}")
    if np.issubdtype(ranks.dtype, np.floating):
        ranks = rank_from_scores(ranks, top_k=top_k)
    elif not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be integer indices or float scores, got dtype {ranks.dtype}")
    nq, K = ranks.shape
    if len(gnd) != nq:
        raise ValueError(f"{nq} rankings for {len(gnd)} ground-truth queries")
    kappas = np.asarray(list(kappas), dtype=np.int64)
    if kappas.size and kappas.min() <= 0:
        raise ValueError(f"kappas must be positive, got {kappas.tolist()}")

    oks = [_as_index_array(g.get("ok")) for g in gnd]
    junks = [_as_index_array(g.get("junk")) for g in gnd]
    n_pos = np.array([o.size for o in oks], dtype=np.int64)
    if ranks.size and ranks.min() < 0:
        raise ValueError("ranks contain negative indices")
    width = int(ranks.max()) + 1 if ranks.size else 0
    for a in oks + junks:
        if a.size:
            if a.min() < 0:
                raise ValueError("ground truth contains negative indices")
            width = max(width, int(a.max()) + 1)

    aps = np.full(nq, np.nan)
    prs = np.full((nq, kappas.size), np.nan)
    chunk = max(1, _CHUNK_ELEMS // max(K, width, 1))
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        c = stop - start
        # label of every database image for these queries: bit 1 = ok, bit 2 = junk
        labels = np.zeros((c, width), dtype=np.uint8)
        for i in range(c):
            labels[i, junks[start + i]] = 2
            labels[i, oks[start + i]] |= 1
        lab = np.take_along_axis(labels, ranks[start:stop], axis=1)  # (c, K)
        is_ok = (lab & 1).astype(bool)
        is_junk = (lab >> 1).astype(np.int32)
        junk_before = np.cumsum(is_junk, axis=1, dtype=np.int64) - is_junk  # strictly before
        ok_before = np.cumsum(is_ok, axis=1, dtype=np.int64) - is_ok
        qi, p = np.nonzero(is_ok)  # row-major: positions ascending within each query
        r = (p - junk_before[qi, p]).astype(np.float64)  # junk-adjusted 0-based position
        j = ok_before[qi, p].astype(np.float64)  # this is the j-th positive (0-based)
        prec0 = np.divide(j, r, out=np.ones_like(r), where=r > 0)
        terms = (prec0 + (j + 1.0) / (r + 1.0)) / 2.0
        npos = n_pos[start:stop]
        found = np.bincount(qi, minlength=c)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = np.bincount(qi, weights=terms, minlength=c) / npos
        has = npos > 0
        aps[start:stop][has] = ap[has]

        if kappas.size:
            p1 = r.astype(np.int64) + 1  # 1-based adjusted positions
            maxpos = np.zeros(c, dtype=np.int64)
            np.maximum.at(maxpos, qi, p1)
            missed = found < npos
            for t, k in enumerate(kappas):
                kq = np.where(missed, k, np.minimum(maxpos, k))
                hits = np.bincount(qi, weights=(p1 <= kq[qi]).astype(np.float64), minlength=c)
                with np.errstate(invalid="ignore", divide="ignore"):
                    pr = hits / kq
                prs[start:stop, t][has] = pr[has]

    valid = n_pos > 0
    if valid.any():
        m = float(np.mean(aps[valid]))
        mp = prs[valid].mean(axis=0)
    else:
        m = float("nan")
        mp = np.full(kappas.size, np.nan)
    return MapResult(m, aps, mp, prs)


def revisitop_protocols(gnd: Mapping | Sequence[Mapping]) -> dict[str, list[dict[str, np.ndarray]]]:
    """The three revisitop protocols of a ground truth (the .pkl dict, or its ``gnd`` list).

    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
    Hard: ok = hard, junk = junk + easy.  (Radenović et al., CVPR'18.)
    """
    if isinstance(gnd, Mapping):
        if "gnd" not in gnd:
            raise ValueError("ground truth dict has no 'gnd' entry (expected revisitop format)")
        gnd = gnd["gnd"]
    out: dict[str, list[dict[str, np.ndarray]]] = {p: [] for p in PROTOCOLS}
    for i, g in enumerate(gnd):
        missing = [k for k in ("easy", "hard", "junk") if k not in g]
        if missing:
            raise ValueError(f"ground-truth query {i} lacks {missing} (expected revisitop format)")
        easy, hard, junk = (_as_index_array(g[k]) for k in ("easy", "hard", "junk"))
        out["easy"].append({"ok": easy, "junk": np.concatenate([junk, hard])})
        out["medium"].append({"ok": np.concatenate([easy, hard]), "junk": junk})
        out["hard"].append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def evaluate_revisitop(
    scores: np.ndarray,
    gnd: Mapping | Sequence[Mapping],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    top_k: int | None = None,
) -> dict:
    """E/M/H mAP and mP@k in percent, from a score matrix (nq, ndb) or an integer ranking (nq, K).

    Returns ``{"mAP": {"easy", "medium", "hard"}, "mP": {protocol: {k: value}}}`` (percent,
    NaN when no query has positives), plus ``"kappas"`` and ``"top_k"``. One ranking serves the
    three protocols. ``top_k`` limits the ranking of a score matrix (see the module doc).
    """
    arr = np.asarray(scores)
    ranks = rank_from_scores(arr, top_k) if np.issubdtype(arr.dtype, np.floating) else arr
    protocols = revisitop_protocols(gnd)
    out: dict = {"mAP": {}, "mP": {}, "kappas": [int(k) for k in kappas], "top_k": top_k}
    for name in PROTOCOLS:
        res = compute_map(ranks, protocols[name], kappas)
        out["mAP"][name] = 100.0 * res.map
        out["mP"][name] = {int(k): 100.0 * float(v) for k, v in zip(kappas, res.mp)}
    return out


# --------------------------------------------------------------------------------------------
# original Oxford5k / Paris6k protocol
# --------------------------------------------------------------------------------------------


def evaluate_original(
    scores: np.ndarray,
    gnd: Sequence[Mapping[str, Iterable[int]]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    top_k: int | None = None,
) -> dict:
    """mAP (percent) of the original Oxford5k/Paris6k protocol (Philbin et al., CVPR'07/'08).

    ``gnd``: per query ``{"ok": good + ok, "junk": junk}`` (database indices, see
    ``cbir.datasets.original``). The AP is the same trapezoid AP with junk images taken out of the
    ranking as Oxford's ``compute_ap.cpp`` (which revisitop's AP reproduces), so this is
    :func:`compute_map` on those sets. Returns ``{"mAP": .., "mP": {k: ..}, "kappas", "top_k"}``.
    """
    res = compute_map(np.asarray(scores), gnd, kappas, top_k=top_k)
    return {
        "mAP": 100.0 * res.map,
        "mP": {int(k): 100.0 * float(v) for k, v in zip(kappas, res.mp)},
        "kappas": [int(k) for k in kappas],
        "top_k": top_k,
    }


# --------------------------------------------------------------------------------------------
# Google Landmarks v2 retrieval: mAP@100 (Kaggle definition), recall@k
# --------------------------------------------------------------------------------------------


def _relevance(ranks: np.ndarray, relevant: Sequence[Iterable[int]]) -> tuple[np.ndarray, np.ndarray]:
    """rel (nq, K) bool: ranks[i, r] is relevant for query i; and m (nq,) = #relevant per query."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be a 2-D integer array, got shape {ranks.shape} dtype {ranks.dtype}")
    if len(relevant) != ranks.shape[0]:
        raise ValueError(f"{ranks.shape[0]} rankings for {len(relevant)} ground-truth queries")
    rel = np.zeros(ranks.shape, dtype=bool)
    m = np.zeros(ranks.shape[0], dtype=np.int64)
    for i, r in enumerate(relevant):
        r = np.unique(_as_index_array(r))
        m[i] = r.size
        if r.size:
            rel[i] = np.isin(ranks[i], r)
    return rel, m


def map_at_k(ranks: np.ndarray, relevant: Sequence[Iterable[int]], k: int = 100) -> float:
    """Kaggle/GLDv2 retrieval mAP@k (Weyand et al., CVPR'20), as a fraction.

    mAP@k = 1/Q sum_q 1/min(m_q, k) sum_{i<=k} P_q(i) rel_q(i), over the Q queries with m_q > 0
    relevant images (queries without any, "Usage: Ignored" in the solution file, are left out);
    P_q(i) is the precision at rank i, rel_q(i) = 1 if the i-th prediction is relevant.
    ``ranks`` (nq, >=k or fewer) integer predictions, best first; only the first k count.
    """
    ranks = np.asarray(ranks)[:, :k]
    rel, m = _relevance(ranks, relevant)
    valid = m > 0
    if not valid.any():
        return float("nan")
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, ranks.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (prec * rel).sum(axis=1) / np.minimum(m, k)
    return float(ap[valid].mean())


def recall_at_k(ranks: np.ndarray, relevant: Sequence[Iterable[int]], ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k as in retrieval/metric-learning papers: the fraction of queries (with at least one
    relevant image) that have at least one relevant image among their first k results."""
    ranks = np.asarray(ranks)
    rel, m = _relevance(ranks[:, : max(ks)], relevant)
    valid = m > 0
    out = {}
    for k in ks:
        hit = rel[:, :k].any(axis=1)
        out[int(k)] = float(hit[valid].mean()) if valid.any() else float("nan")
    return out
