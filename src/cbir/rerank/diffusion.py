"""Diffusion on the database's kNN graph (Iscen et al. CVPR'17; offline form: Yang et al. AAAI'19).

Notation (Zhou et al. NIPS'03 "ranking on data manifolds", as used by Iscen et al.):

- affinity ``W`` (n x n, sparse, symmetric, zero diagonal): ``w_ij = max(x_i.x_j, 0)^gamma`` when
  ``x_j`` is among the k nearest neighbours of ``x_i`` *and* ``x_i`` among those of ``x_j``
  (mutual / reciprocal neighbours; ``mutual=False`` keeps an edge found from either side);
- ``S = D^-1/2 W D^-1/2`` with ``D = diag(W 1)`` (isolated nodes keep a zero row);
- the query's start vector ``y`` (n,): ``y_i = max(q.x_i, 0)^gamma`` for the query's kq nearest
  database vectors, 0 elsewhere;
- the ranking ``f = (1 - alpha) (I - alpha S)^-1 y``, the fixed point of
  ``f_t = alpha S f_{t-1} + (1 - alpha) y``; ``I - alpha S`` is symmetric positive definite for
  ``0 <= alpha < 1`` (the eigenvalues of S lie in [-1, 1]), so it is solved by conjugate gradient,
  batched over queries (one sparse-times-dense product per iteration for all of them).
- Truncation (Iscen et al.): for a large database each query is diffused only on the
  subgraph of its top-R database vectors (W restricted to them, normalised again on the subgraph).
- Offline form (Yang et al. AAAI'19, "decoupling diffusion into online and offline"): because f
  is linear in y, ``f = sum_i y_i L[:, i]`` with ``L = (1 - alpha)(I - alpha S)^-1``. The columns
  of L are computed offline (CG with ``e_i`` as right-hand side) and sparsified to their top-m
  entries; the online cost is a sparse combination of the k columns of the query's neighbours.

Final scores (``sim_weight`` = beta): ``score_i = f_i / max_j f_j + beta max(q.x_i, 0)^gamma``, i.e.
the diffusion ranking, normalised per query, plus beta times the query's own start weights on
every item; items with score 0 (not reached and not similar) rank after them by the original
similarity (``similarity - UNREACHED_OFFSET``). beta = 0 is the pure diffusion ranking of Iscen et
al. (items with f = 0 ranked by similarity after the reached ones).

Defaults (:class:`DiffusionParams`, :meth:`DiffusionParams.for_database`) are the safe ones of
docs/rerank.md, not the paper's (k = 50, kq = 10, alpha = 0.99, R = 1000, beta = 0: available as
:data:`PAPER`), which lowered mAP on two of our three real sets: graph k = min(20, max(2, n // 10)),
kq = 3, gamma = 3, alpha = 0.8, beta = 0.5, 20 CG iterations, no truncation up to
``TRUNC_ABOVE`` = 100,000 database items and R = 10,000 above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # scipy is imported where a graph is built: `cbir search` without diffusion never loads it
    import scipy.sparse as sp

from ..schema import MAX_EXPONENT, MAX_NEIGHBOURS, Bool, Float, Int, Schema
from .knn import knn_search, topk

#: Scores of items the diffusion did not reach are ``similarity - UNREACHED_OFFSET`` (< 0 <= f).
UNREACHED_OFFSET = 3.0


#: Database size above which :meth:`DiffusionParams.for_database` truncates, and the region size.
TRUNC_ABOVE = 100_000
TRUNC_R = 10_000


#: Largest truncation region and conjugate-gradient iteration count a DiffusionParams accepts.
MAX_TRUNC = 100_000_000
MAX_ITER = 10_000


class DiffusionParams(Schema):
    """Parameters of diffusion; the defaults are the safe ones (docs/rerank.md), see
    :meth:`for_database` for the database-relative k and truncation.

    k: neighbours per node in the database graph (1..MAX_NEIGHBOURS); kq: neighbours of the query in
    y (1..MAX_NEIGHBOURS); gamma: similarity exponent in (0, 100]; alpha: diffusion weight in [0, 1);
    trunc: truncation size R (0 = diffuse on the whole graph; used only when the database is larger
    than R); maxiter/tol: conjugate gradient stop (iterations 1..10,000, relative residual in (0, 1));
    mutual: reciprocal kNN; sim_weight: beta of the final score ``f / max f + beta max(s, 0)^gamma``
    in [0, 1000] (0 = pure diffusion). Every value is checked (:mod:`cbir.schema`): a NaN, a string
    or a float where an integer belongs raises :class:`cbir.schema.SchemaError` naming the field.
    """

    k: Int(ge=1, le=MAX_NEIGHBOURS) = 20
    kq: Int(ge=1, le=MAX_NEIGHBOURS) = 3
    gamma: Float(gt=0.0, le=MAX_EXPONENT) = 3.0
    alpha: Float(ge=0.0, lt=1.0) = 0.8
    trunc: Int(ge=0, le=MAX_TRUNC) = 0
    maxiter: Int(ge=1, le=MAX_ITER) = 20
    tol: Float(gt=0.0, lt=1.0) = 1e-6
    mutual: Bool = True
    sim_weight: Float(ge=0.0, le=1000.0) = 0.5

    @classmethod
    def for_database(cls, n: int, **given: object) -> "DiffusionParams":
        """The defaults for a database of n items; ``given`` (not None) override them.

        k = min(20, max(2, n // 10)) (a graph of at most a tenth of a small database);
        trunc = 0 (whole graph) for n <= TRUNC_ABOVE, else TRUNC_R; the rest: the class defaults.
        """
        auto = {"k": min(20, max(2, int(n) // 10)), "trunc": 0 if n <= TRUNC_ABOVE else TRUNC_R}
        auto.update({key: v for key, v in given.items() if v is not None})
        return cls(**auto)


class DiffusionOptions(Schema):
    """The diffusion parameters a user gave (None: follows the database size, :meth:`DiffusionParams.for_database`);
    each given one has the range of :class:`DiffusionParams`. ``resolve(n)`` -> DiffusionParams."""

    k: Int(ge=1, le=MAX_NEIGHBOURS) | None = None
    kq: Int(ge=1, le=MAX_NEIGHBOURS) | None = None
    gamma: Float(gt=0.0, le=MAX_EXPONENT) | None = None
    alpha: Float(ge=0.0, lt=1.0) | None = None
    trunc: Int(ge=0, le=MAX_TRUNC) | None = None
    maxiter: Int(ge=1, le=MAX_ITER) | None = None
    tol: Float(gt=0.0, lt=1.0) | None = None
    mutual: Bool | None = None
    sim_weight: Float(ge=0.0, le=1000.0) | None = None

    def given(self) -> dict:
        """The parameters given (JSON-ready)."""
        return self.model_dump(exclude_none=True)

    def to_dict(self) -> dict:
        return self.given()

    def resolve(self, n: int) -> DiffusionParams:
        """The parameters for a database of n items: the given ones, the rest by the database size."""
        return DiffusionParams.for_database(n, **self.given())


#: The defaults of Iscen et al. CVPR'17 (and their code), for comparison.
PAPER = DiffusionParams(k=50, kq=10, gamma=3.0, alpha=0.99, trunc=1000, sim_weight=0.0)


# ----------------------------------------------------------------------------- kNN and graph


def graph_from_knn(sims: np.ndarray, idx: np.ndarray, gamma: float = 3.0, mutual: bool = True) -> sp.csr_matrix:
    """Affinity ``W`` (n x n csr, float32, symmetric) from each node's neighbour lists (n, k).

    Self-neighbours are dropped; ``w = max(s, 0)^gamma``; mutual: ``W = min(A, A^T)`` (an edge
    only when each is in the other's list), else ``W = max(A, A^T)``.
    """
    import scipy.sparse as sp

    n, k = idx.shape
    rows = np.repeat(np.arange(n), k)
    cols = idx.ravel()
    vals = np.maximum(sims.ravel(), 0.0).astype(np.float32) ** np.float32(gamma)
    keep = (cols != rows) & (cols >= 0) & (vals > 0)
    a = sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(n, n), dtype=np.float32)
    w = a.minimum(a.T) if mutual else a.maximum(a.T)
    w = sp.csr_matrix(w, dtype=np.float32)
    w.eliminate_zeros()
    w.sort_indices()
    return w


def knn_graph(
    x: np.ndarray, k: int = 50, gamma: float = 3.0, mutual: bool = True, nlist: int = 0, nprobe: int = 8
) -> sp.csr_matrix:
    """kNN affinity graph of the rows of x (n, D), L2-normalised (see :func:`graph_from_knn`).

    Each node's k neighbours exclude itself (k + 1 are searched); exact faiss search unless
    ``nlist > 0`` (approximate IVF search, for databases too large for n^2 products).
    """
    sims, idx = knn_search(x, x, k + 1, nlist=nlist, nprobe=nprobe)
    drop = idx == np.arange(len(idx))[:, None]
    no_self = ~drop.any(axis=1)
    drop[no_self, -1] = True  # self not found (duplicates, IVF): drop the k+1-th instead
    if drop.sum(axis=1).max(initial=1) == 1 and idx.shape[1] > 1:
        keep = ~drop
        m = idx.shape[1] - 1
        sims, idx = sims[keep].reshape(-1, m), idx[keep].reshape(-1, m)
    return graph_from_knn(sims, idx, gamma=gamma, mutual=mutual)


def normalize_graph(w: sp.spmatrix) -> sp.csr_matrix:
    """``S = D^-1/2 W D^-1/2`` with ``D = diag(W 1)``; rows/columns of isolated nodes stay zero."""
    import scipy.sparse as sp

    w = sp.csr_matrix(w)
    deg = np.asarray(w.sum(axis=1)).ravel()
    inv = np.zeros_like(deg)
    np.divide(1.0, np.sqrt(deg), out=inv, where=deg > 0)
    rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
    data = (w.data * inv[rows] * inv[w.indices]).astype(w.dtype)
    return sp.csr_matrix((data, w.indices.copy(), w.indptr.copy()), shape=w.shape)


def query_vectors(sims: np.ndarray, idx: np.ndarray, n: int, gamma: float) -> np.ndarray:
    """Start vectors Y (n, nq) float64: ``Y[idx[j, i], j] = max(sims[j, i], 0)^gamma``."""
    nq = idx.shape[0]
    y = np.zeros((n, nq), dtype=np.float64)
    cols = np.repeat(np.arange(nq), idx.shape[1])
    y[idx.ravel(), cols] = np.maximum(sims.ravel().astype(np.float64), 0.0) ** gamma
    return y


# ----------------------------------------------------------------------------- solvers


def cg(
    matvec: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    tol: float = 1e-6,
    maxiter: int = 20,
) -> tuple[np.ndarray, int]:
    """Conjugate gradient for ``A X = B`` with A symmetric positive definite, column by column.

    ``matvec(P)`` returns ``A @ P`` for P (n, m); each column keeps its own step sizes, so the
    result is that of m independent CG runs, at the cost of one matrix product per iteration.
    Starts from X = 0; stops when every column's residual is below ``tol * ||b_j||`` or after
    maxiter iterations. Returns (X (n, m) float64, iterations done).
    """
    b = np.asarray(b, dtype=np.float64)
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = np.einsum("ij,ij->j", r, r)
    stop = (tol**2) * rs
    it = 0
    for it in range(1, maxiter + 1):
        if np.all(rs <= stop):
            it -= 1
            break
        ap = matvec(p)
        pap = np.einsum("ij,ij->j", p, ap)
        step = np.divide(rs, pap, out=np.zeros_like(rs), where=pap > 0)
        x += step * p
        r -= step * ap
        rs_new = np.einsum("ij,ij->j", r, r)
        beta = np.divide(rs_new, rs, out=np.zeros_like(rs), where=rs > 0)
        p = r + beta * p
        rs = rs_new
    return x, it


def diffuse(s: sp.spmatrix, y: np.ndarray, alpha: float = 0.99, maxiter: int = 20, tol: float = 1e-6) -> np.ndarray:
    """``F = (1 - alpha) (I - alpha S)^-1 Y`` by conjugate gradient. S (n, n), Y (n, m) -> (n, m)."""
    import scipy.sparse as sp

    s = sp.csr_matrix(s)
    y = np.asarray(y, dtype=np.float64)
    vec = y.ndim == 1
    if vec:
        y = y[:, None]
    x, _ = cg(lambda p: p - alpha * (s @ p), y, tol=tol, maxiter=maxiter)
    f = (1.0 - alpha) * x
    return f[:, 0] if vec else f


# ----------------------------------------------------------------------------- online ranking


def final_scores(f: np.ndarray, sim: np.ndarray, params: DiffusionParams) -> np.ndarray:
    """Final scores (nq, n) float32 of the module docstring from f (nq, n) and sim (nq, n).

    beta = 0: f where f > 0, else ``sim - UNREACHED_OFFSET``. beta > 0:
    ``f / max_j f_j + beta max(sim, 0)^gamma`` where that is > 0, else ``sim - UNREACHED_OFFSET``.
    """
    f = np.maximum(np.asarray(f, dtype=np.float64), 0.0)
    if params.sim_weight > 0:
        top = f.max(axis=1, keepdims=True)
        f = np.divide(f, top, out=np.zeros_like(f), where=top > 0)
        f = f + params.sim_weight * np.maximum(np.asarray(sim, dtype=np.float64), 0.0) ** params.gamma
    return np.where(f > 0, f, sim - UNREACHED_OFFSET).astype(np.float32)


def diffusion_scores(
    q: np.ndarray,
    db: np.ndarray,
    params: DiffusionParams = DiffusionParams(),
    graph: sp.spmatrix | None = None,
    sim: np.ndarray | None = None,
) -> np.ndarray:
    """Diffusion scores (nq, n) float32 of queries q (nq, D) over database db (n, D).

    ``graph``: the affinity W of db (from :func:`knn_graph`, built with params.k/gamma/mutual if
    None). ``sim``: q @ db.T if already computed. Full diffusion when ``params.trunc`` is 0 or
    >= n, else truncated to each query's top-R region. Scores: see the module docstring.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    db = np.ascontiguousarray(db, dtype=np.float32)
    n = db.shape[0]
    if graph is None:
        graph = knn_graph(db, k=params.k, gamma=params.gamma, mutual=params.mutual)
    if graph.shape != (n, n):
        raise ValueError(f"graph shape {graph.shape} does not match the database size {n}")
    if sim is None:
        sim = q @ db.T
    sim = np.asarray(sim, dtype=np.float32)
    kq = min(params.kq, n)
    if params.trunc <= 0 or params.trunc >= n:
        s, idx = topk(sim, kq)
        y = query_vectors(s, idx, n, params.gamma)
        f = diffuse(normalize_graph(graph), y, params.alpha, params.maxiter, params.tol).T
        return final_scores(f, sim, params)
    return final_scores(_truncated(sim, graph, params), sim, params)


def truncated_subgraphs(graph: sp.spmatrix, regions: np.ndarray, max_table: int = 8_000_000) -> sp.csr_matrix:
    """Block-diagonal matrix of the subgraphs ``W[r][:, r]`` for each row r of ``regions`` (nq, R).

    Block j (rows/columns ``j*R .. j*R+R-1``) is W restricted to region j, in the region's order.
    Vectorised over regions: their rows are gathered at once and each edge's column is mapped to
    its position in its region, through a (group, n) lookup table when n is small enough (groups
    of regions with at most ``max_table`` entries, at least 16 regions), else through a binary
    search in the sorted (region, node) keys. Returns (nq*R, nq*R) csr.
    """
    import scipy.sparse as sp

    graph = sp.csr_matrix(graph)
    n = graph.shape[0]
    nq, r = regions.shape
    regions = np.asarray(regions, dtype=np.int64)
    rows = graph[regions.ravel()]  # (nq*R, n): every region's rows, in order
    q_of_edge = np.repeat(np.arange(nq * r, dtype=np.int64) // r, np.diff(rows.indptr))
    group = max_table // max(n, 1)
    if group >= min(16, nq):
        local = np.empty(len(rows.indices), dtype=np.int64)
        pos = np.arange(r, dtype=np.int64)[None, :]
        for g0 in range(0, nq, group):
            g1 = min(g0 + group, nq)
            table = np.full((g1 - g0, n), -1, dtype=np.int64)
            np.put_along_axis(table, regions[g0:g1], pos, axis=1)
            e0, e1 = rows.indptr[g0 * r], rows.indptr[g1 * r]
            local[e0:e1] = table[q_of_edge[e0:e1] - g0, rows.indices[e0:e1]]
        hit = local >= 0
        cols = q_of_edge[hit] * r + local[hit]
    else:
        region_key = regions.ravel() + (np.arange(nq * r, dtype=np.int64) // r) * n  # j*n + node
        order = np.argsort(region_key)
        sorted_keys = region_key[order]
        edge_key = q_of_edge * n + rows.indices
        loc = np.minimum(np.searchsorted(sorted_keys, edge_key), len(sorted_keys) - 1)
        hit = sorted_keys[loc] == edge_key
        cols = order[loc[hit]]
    kept = np.zeros(len(hit) + 1, dtype=np.int64)
    np.cumsum(hit, out=kept[1:])
    indptr = kept[rows.indptr]
    return sp.csr_matrix((rows.data[hit], cols, indptr), shape=(nq * r, nq * r))


def truncated_diffusion(
    sims: np.ndarray, regions: np.ndarray, graph: sp.spmatrix, params: DiffusionParams = DiffusionParams()
) -> np.ndarray:
    """Diffusion of each query on the subgraph of its region -> f (nq, R) float64.

    ``regions`` (nq, R): each query's top-R database indices, best first, and ``sims`` (nq, R)
    their similarities (the first ``params.kq`` make the start vector). All queries' subgraphs
    form one block-diagonal matrix, normalised at once (degrees are per block, i.e. on the
    subgraph) and solved by one batched CG whose column j lives on block j. This is the whole
    online cost apart from the top-R search; it does not depend on the database size.
    """
    nq, r = regions.shape
    big = normalize_graph(truncated_subgraphs(graph, regions))
    big.sort_indices()  # sorted columns make the 20 products below ~3x faster
    y = np.zeros((r, nq), dtype=np.float64)
    kq = min(params.kq, r)
    y[:kq] = (np.maximum(sims[:, :kq], 0.0).astype(np.float64) ** params.gamma).T
    alpha = params.alpha

    def matvec(p: np.ndarray) -> np.ndarray:  # p (R, nq): column j lives on block j
        return p - alpha * (big @ p.T.reshape(-1)).reshape(nq, r).T

    x, _ = cg(matvec, y, tol=params.tol, maxiter=params.maxiter)
    return (1.0 - alpha) * x.T


def _truncated(sim: np.ndarray, graph: sp.spmatrix, params: DiffusionParams) -> np.ndarray:
    """Truncated diffusion from the full similarity matrix (nq, n) -> f (nq, n), 0 outside regions."""
    s, idx = topk(sim, params.trunc)  # (nq, R), best first: the query's kq neighbours come first
    f = np.zeros(sim.shape, dtype=np.float64)
    np.put_along_axis(f, idx, truncated_diffusion(s, idx, graph, params), axis=1)
    return f


# ----------------------------------------------------------------------------- offline form


@dataclass
class OfflineDiffusion:
    """Precomputed database side of diffusion (Yang et al. AAAI'19).

    ``columns`` (n x n csr): row i holds column i of ``L = (1 - alpha)(I - alpha S)^-1`` kept to
    its ``topm`` largest entries. Online: ``f = Y^T columns`` for the queries' sparse start vectors
    (kq non-zeros each), i.e. a sparse combination of kq precomputed rows per query.
    """

    columns: sp.csr_matrix
    params: DiffusionParams
    topm: int

    @classmethod
    def build(
        cls,
        db: np.ndarray,
        params: DiffusionParams = DiffusionParams(),
        topm: int = 200,
        graph: sp.spmatrix | None = None,
        chunk: int = 512,
    ) -> "OfflineDiffusion":
        """Solve ``(I - alpha S) l_i = (1 - alpha) e_i`` for every database item (CG, chunks of
        right-hand sides) and keep each solution's top-m entries. Cost: n CG solves."""
        import scipy.sparse as sp

        n = db.shape[0]
        if graph is None:
            graph = knn_graph(db, k=params.k, gamma=params.gamma, mutual=params.mutual)
        s = normalize_graph(graph)
        m = int(min(topm, n))
        data, cols = [], []
        for start in range(0, n, chunk):
            ids = np.arange(start, min(start + chunk, n))
            e = np.zeros((n, len(ids)))
            e[ids, np.arange(len(ids))] = 1.0
            f = diffuse(s, e, params.alpha, params.maxiter, params.tol).T  # (chunk, n)
            v, j = topk(f, m)
            data.append(v.astype(np.float32))
            cols.append(j)
        data_a = np.concatenate(data).ravel()
        cols_a = np.concatenate(cols).ravel()
        rows = np.repeat(np.arange(n), m)
        keep = data_a > 0
        columns = sp.csr_matrix((data_a[keep], (rows[keep], cols_a[keep])), shape=(n, n), dtype=np.float32)
        return cls(columns=columns, params=params, topm=m)

    def nbytes(self) -> int:
        """Memory of the precomputed matrix (data + indices + indptr), bytes."""
        c = self.columns
        return int(c.data.nbytes + c.indices.nbytes + c.indptr.nbytes)

    def scores(self, q: np.ndarray, db: np.ndarray, sim: np.ndarray | None = None) -> np.ndarray:
        """Online diffusion scores (nq, n) float32 (final scores as in the module docstring)."""
        import scipy.sparse as sp

        n = self.columns.shape[0]
        if sim is None:
            sim = np.ascontiguousarray(q, dtype=np.float32) @ np.ascontiguousarray(db, dtype=np.float32).T
        s, idx = topk(sim, min(self.params.kq, n))
        w = np.maximum(s, 0.0).astype(np.float32) ** np.float32(self.params.gamma)
        nq = idx.shape[0]
        yt = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(nq), idx.shape[1]), idx.ravel())), shape=(nq, n))
        f = (yt @ self.columns).toarray()
        return final_scores(f, sim, self.params)
