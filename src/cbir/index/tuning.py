"""Search parameters chosen for a recall target with faiss's own auto-tuning (``faiss.ParameterSpace``).

recall@k of a query = |approximate top-k ∩ exact top-k| / k (faiss ``IntersectionCriterion``),
averaged over held-out queries. ``ParameterSpace.explore`` runs the queries under combinations of
the index's search-time knobs (``nprobe``, ``quantizer_efSearch``, ``efSearch``, ``k_factor_rf``...),
timing each, and keeps the Pareto-optimal (recall, time) operating points. We take the fastest
point whose recall reaches ``target + margin``; the margin absorbs the difference between the
tuning queries and other queries drawn from the same distribution.

The exact top-k (ground truth) is computed by :func:`cbir.index.exact.exact_topk` over the stored
vectors. Tune on queries you will not report figures on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .exact import database_tensor, exact_topk, resolve_device


@dataclass(frozen=True)
class TuneResult:
    """The chosen faiss search string and what it measured on the tuning queries.

    search: ParameterSpace key ("nprobe=32,quantizer_efSearch=64,k_factor_rf=4"); recall: mean
    recall@k on the tuning queries; ms_per_query: batched time / nq; reached: recall >= target.
    curve: the Pareto-optimal operating points [(recall, ms_per_query, key)].
    """

    search: str
    recall: float
    ms_per_query: float
    target: float
    k: int
    queries: int
    reached: bool
    curve: tuple[tuple[float, float, str], ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["curve"] = [list(p) for p in self.curve]
        return d


def exact_ground_truth(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows (nq, k) of the exact top-k inner products of ``queries`` in ``vectors`` (CPU, float32)."""
    db = database_tensor(vectors, resolve_device("cpu"))
    return exact_topk(queries, db, k)[1]


def tune_faiss(index, queries: np.ndarray, gt: np.ndarray, *, target: float, margin: float = 0.005,
               n_experiments: int = 200) -> TuneResult:
    """Explore the ParameterSpace of the faiss ``index`` on ``queries`` (nq, D) against labels ``gt``
    (nq, k) and set the fastest operating point with recall >= target + margin (the best recall
    when none reaches it). Returns the :class:`TuneResult`; the index keeps the chosen setting."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    gt = np.ascontiguousarray(gt, dtype=np.int64)
    nq, k = gt.shape
    ps = faiss.ParameterSpace()
    ps.initialize(index)
    ps.n_experiments = int(n_experiments)
    ps.verbose = 0
    crit = faiss.IntersectionCriterion(nq, k)
    crit.set_groundtruth(None, gt)
    ops = ps.explore(index, q, crit)
    pts = ops.optimal_pts
    curve = tuple((float(pts.at(i).perf), 1000.0 * float(pts.at(i).t) / nq, str(pts.at(i).key))
                  for i in range(pts.size()) if pts.at(i).key != "" or ps.parameter_ranges.size() == 0)
    if not curve:
        raise RuntimeError("faiss parameter exploration returned no operating point")
    good = [p for p in curve if p[0] >= target + margin]
    best = min(good, key=lambda p: p[1]) if good else max(curve, key=lambda p: (p[0], -p[1]))
    if best[2]:
        ps.set_index_parameters(index, best[2])
    return TuneResult(search=best[2], recall=best[0], ms_per_query=best[1], target=float(target), k=int(k),
                      queries=int(nq), reached=best[0] >= target, curve=curve)
