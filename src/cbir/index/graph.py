"""The index's kNN graph for diffusion: built once with the index, stored with each generation,
kept current on add/remove.

Stored as neighbour lists in the store's row order: ``ids`` (n, k) int64 image ids and ``sims``
(n, k) float32 inner products, best first, the node itself excluded, -1 / -inf padding where
fewer than k others exist. The affinity ``W`` of diffusion (Iscen et al. CVPR'17) is derived from
the lists by :func:`cbir.rerank.diffusion.graph_from_knn` (``w_ij = max(s_ij, 0)^gamma``, mutual
neighbours), for any ``k' <= k`` (the first k' of each list are its k' nearest neighbours) and any
gamma, so diffusion settings can change without rebuilding the lists.

Maintenance (exact: after any add/remove the lists equal those of a fresh exact build):

- add m vectors: their own lists by a search of the whole store; for every old node, the new
  vectors whose similarity beats its current k-th enter its list (one (n, m) product);
- remove: lists of removed nodes go; a node that listed a removed one is searched again.

Build: exact faiss search (``IndexFlatIP``) up to ``exact_max`` vectors; above, an inverted file
(``IndexIVFFlat``, ~4·sqrt(n) lists, ``nprobe`` visited): approximate lists, found in minutes at 1M.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fileio import FormatError

GRAPH_IDS, GRAPH_SIMS = "graph_ids.npy", "graph_sims.npy"


def _search(queries: np.ndarray, base: np.ndarray, k: int, *, nlist: int = 0, nprobe: int = 16,
            batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of queries in base rows -> (sims (nq, k), rows (nq, k)), -1 padded (faiss)."""
    from ..rerank.knn import ip_index

    index = ip_index(base, nlist=nlist, nprobe=nprobe)
    nq = len(queries)
    sims = np.empty((nq, k), np.float32)
    rows = np.empty((nq, k), np.int64)
    for s in range(0, nq, batch):
        sims[s:s + batch], rows[s:s + batch] = index.search(np.ascontiguousarray(queries[s:s + batch], np.float32), k)
    return sims, rows


def _drop_self(sims: np.ndarray, rows: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per node, drop the node itself (own row), else the last; keep k."""
    drop = rows == own[:, None]
    first = drop & (np.cumsum(drop, axis=1) == 1)
    none = ~first.any(axis=1)
    first[none, -1] = True
    keep = ~first
    return sims[keep].reshape(-1, k), rows[keep].reshape(-1, k)


def _merge(sims_a, ids_a, sims_b, ids_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of two candidate lists per row (ties: the earlier list first), best first."""
    s = np.concatenate([sims_a, sims_b], axis=1)
    i = np.concatenate([ids_a, ids_b], axis=1)
    s = np.where(i >= 0, s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1).astype(np.float32), np.take_along_axis(i, order, axis=1)


@dataclass
class KnnGraph:
    """Neighbour lists (see module doc): ``ids`` (n, k) image ids, ``sims`` (n, k), in store row order."""

    ids: np.ndarray
    sims: np.ndarray
    exact: bool = True

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def build(cls, vectors: np.ndarray, store_ids: np.ndarray, k: int, *, exact_max: int = 200_000,
              nprobe: int = 16) -> "KnnGraph":
        """Lists of the k nearest other rows of ``vectors`` (n, D); approximate above ``exact_max``."""
        n = len(vectors)
        if k < 1:
            raise ValueError(f"graph k must be >= 1, got {k}")
        if n == 0:
            return cls(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        exact = n <= exact_max
        nlist = 0 if exact else int(4 * np.sqrt(n))
        kk = min(k + 1, n)
        sims, rows = _search(vectors, vectors, kk, nlist=nlist, nprobe=nprobe)
        sims, rows = _drop_self(sims, rows, np.arange(n), kk - 1)
        return cls(*cls._pad(np.where(rows >= 0, store_ids[np.maximum(rows, 0)], -1), sims, k), exact=exact)

    @staticmethod
    def _pad(ids: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
        if ids.shape[1] < k:
            extra = k - ids.shape[1]
            ids = np.concatenate([ids, np.full((len(ids), extra), -1, np.int64)], axis=1)
            sims = np.concatenate([sims, np.full((len(sims), extra), -np.inf, np.float32)], axis=1)
        return ids.astype(np.int64), sims

    # --- maintenance (the store has already changed) --------------------------------------
    def on_add(self, vectors: np.ndarray, store_ids: np.ndarray, new_ids: np.ndarray) -> None:
        """The store now holds ``vectors``/``store_ids`` whose last rows are ``new_ids``."""
        m, n, k = len(new_ids), len(store_ids), self.k
        if m == 0:
            return
        new_rows = np.arange(n - m, n)
        kk = min(k + 1, n)
        sims, rows = _search(vectors[new_rows], vectors, kk)
        sims, rows = _drop_self(sims, rows, new_rows, kk - 1)
        new_ids_l, new_sims_l = self._pad(np.where(rows >= 0, store_ids[np.maximum(rows, 0)], -1), sims, k)
        old = n - m
        step = max(1, (1 << 24) // m)  # at most 16M similarities at once
        for a in range(0, old, step):
            b = min(a + step, old)
            s = vectors[a:b] @ vectors[new_rows].T  # (b - a, m)
            touched = np.flatnonzero((s > self.sims[a:b, -1][:, None]).any(axis=1))
            if len(touched):
                rows_t = a + touched
                cand_ids = np.broadcast_to(np.asarray(new_ids, np.int64), (len(touched), m))
                self.sims[rows_t], self.ids[rows_t] = _merge(
                    self.sims[rows_t], self.ids[rows_t], s[touched].astype(np.float32), cand_ids, k)
        self.ids = np.concatenate([self.ids, new_ids_l])
        self.sims = np.concatenate([self.sims, new_sims_l])

    def on_remove(self, keep: np.ndarray, vectors: np.ndarray, store_ids: np.ndarray, removed: np.ndarray) -> None:
        """Rows ``keep`` (bool over the old rows) survive; the store now holds ``vectors``/``store_ids``."""
        self.ids, self.sims = self.ids[keep], self.sims[keep]
        stale = np.flatnonzero(np.isin(self.ids, removed).any(axis=1))
        if len(stale):
            kk = min(self.k + 1, len(store_ids))
            sims, rows = _search(vectors[stale], vectors, kk)
            sims, rows = _drop_self(sims, rows, stale, kk - 1)
            self.ids[stale], self.sims[stale] = self._pad(np.where(rows >= 0, store_ids[np.maximum(rows, 0)], -1), sims, self.k)

    # --- diffusion ------------------------------------------------------------------------
    def affinity(self, store_ids: np.ndarray, row_of, k: int, gamma: float, mutual: bool):
        """W (n x n csr over store rows) from the first k neighbours of each list (k <= self.k).

        ``row_of``: image ids -> store rows (``VectorStore.rows_of``)."""
        from ..rerank.diffusion import graph_from_knn

        if k > self.k:
            raise ValueError(f"the index's graph holds {self.k} neighbours per image, diffusion asks for {k}; "
                             f"rebuild it with Index.build_graph(k={k})")
        ids = self.ids[:, :k]
        valid = ids >= 0
        if len(ids) == 0:
            rows = ids
        else:
            rows = np.where(valid, row_of(np.where(valid, ids, store_ids[0])), -1)
        return graph_from_knn(np.where(valid, self.sims[:, :k], 0.0), rows, gamma=gamma, mutual=mutual)

    # --- persistence ----------------------------------------------------------------------
    def save(self, folder: Path) -> list[str]:
        np.save(folder / GRAPH_IDS, np.ascontiguousarray(self.ids), allow_pickle=False)
        np.save(folder / GRAPH_SIMS, np.ascontiguousarray(self.sims), allow_pickle=False)
        return [GRAPH_IDS, GRAPH_SIMS]

    @classmethod
    def load(cls, folder: Path, n: int, exact: bool = True, store_ids: np.ndarray | None = None) -> "KnnGraph":
        """The lists saved in ``folder`` for n stored vectors, checked: shapes and dtypes, every id -1 or
        one of ``store_ids`` (when given), finite similarities where an id is given (FormatError naming
        the graph file, so that a damaged graph is never blamed on a query)."""
        try:
            ids = np.load(folder / GRAPH_IDS, allow_pickle=False)
            sims = np.load(folder / GRAPH_SIMS, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise FormatError(f"{folder}: damaged graph array: {exc}") from exc
        if ids.ndim != 2 or ids.shape != sims.shape or len(ids) != n or ids.dtype != np.int64:
            raise FormatError(f"{folder}: graph lists {ids.shape}/{sims.shape} do not match the {n} vectors")
        if not np.issubdtype(sims.dtype, np.floating):
            raise FormatError(f"{folder / GRAPH_SIMS}: similarities must be floats, got {sims.dtype.name}")
        given = ids >= 0
        if store_ids is not None:
            unknown = given & ~np.isin(ids, np.asarray(store_ids, np.int64))
            if unknown.any() or (ids < -1).any():
                row = int(np.flatnonzero((unknown | (ids < -1)).any(axis=1))[0])
                bad = ids[row][unknown[row] | (ids[row] < -1)][0]
                raise FormatError(f"{folder / GRAPH_IDS}: the neighbour list of row {row} names image id {int(bad)}, "
                                  "which is not in the index: the stored graph is damaged (rebuild it: "
                                  "cbir index build --graph K, or Index.build_graph())")
        if not np.isfinite(sims[given]).all():
            raise FormatError(f"{folder / GRAPH_SIMS}: NaN or infinite similarities: the stored graph is damaged "
                              "(rebuild it: cbir index build --graph K, or Index.build_graph())")
        return cls(ids, sims.astype(np.float32), exact=exact)
