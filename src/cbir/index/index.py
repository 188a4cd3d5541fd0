"""``Index``: a persistent, searchable collection of image descriptors.

The truth is the descriptor matrix by id (:class:`~cbir.index.store.VectorStore`) and the image
metadata (:class:`~cbir.index.store.MetadataDB`); a search structure (:mod:`cbir.index.backends`)
and, optionally, the kNN graph for diffusion (:mod:`cbir.index.graph`) follow every change.
On disk: :mod:`cbir.index.persist` (generations, manifest, checksums); one writer at a time:
:mod:`cbir.index.writer`. Re-ranking runs on the stored vectors and graph:
:meth:`Index.search_rerank`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from . import persist
from ..descriptors import COMPAT_KEYS  # noqa: F401 (re-exported) settings that must agree between index and query
from .backends import Backend, make_backend
from .graph import KnnGraph
from .persist import FORMAT, FORMAT_VERSION, MANIFEST, StaleIndexError, latest_generation, next_free_id  # noqa: F401 (re-exported)
from .store import ImageRecord, MetadataDB, VectorStore

if TYPE_CHECKING:
    from ..rerank.compose import Rerank



class IncompatibleDescriptorError(ValueError):
    """A query descriptor was made with other settings (model, pooling, whitening, dim) than the index."""


@dataclass(frozen=True)
class Hit:
    """One search result: the image id, its path, and the inner-product score (cosine for unit
    vectors; the re-ranking's score when re-ranked). ``inliers``: with spatial verification, the
    inlier count of a result among the query's verified top K (None otherwise)."""

    id: int
    path: str
    score: float
    inliers: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "path": self.path, "score": self.score}
        if self.inliers is not None:
            d["inliers"] = self.inliers
        return d


class RWLock:
    """Many readers or one writer (writers wait for readers to leave; new readers wait for a waiting writer)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def compat_mismatch(index_settings: dict[str, Any], query_settings: dict[str, Any]) -> list[str]:
    """Keys of COMPAT_KEYS set in both dicts with different values, as 'key: index=.. query=..'."""
    out = []
    for key in COMPAT_KEYS:
        if key in index_settings and key in query_settings and _norm(index_settings[key]) != _norm(query_settings[key]):
            out.append(f"{key}: index={index_settings[key]!r}, query={query_settings[key]!r}")
    return out


def _norm(value: Any) -> Any:
    return value if not isinstance(value, (list, tuple)) else [_norm(v) for v in value]


class Index:
    """Descriptors by image id + metadata + a search structure (exact / ivfpq / hnsw).

    Thread-safe: searches run concurrently, changes and saves are exclusive.
    """

    def __init__(self, dim: int, kind: str = "exact", params: dict[str, Any] | None = None,
                 settings: dict[str, Any] | None = None, device: str = "auto") -> None:
        if int(dim) <= 0:
            raise ValueError(f"index dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.settings = dict(settings or {})
        self.settings["dim"] = self.dim
        self.store = VectorStore(self.dim)
        self.meta = MetadataDB()
        self.backend: Backend = make_backend(kind, self.dim, params or {}, device)
        self.created = time.time()
        self.lock = RWLock()
        self.path: Path | None = None  # the folder this index was loaded from / last saved to
        self.generation = 0  # generation number loaded or last saved (0: never saved)
        self.graph: KnnGraph | None = None  # kNN lists for diffusion (build_graph), kept current
        self._affinity: dict[tuple, Any] = {}  # diffusion affinity W per (k, gamma, mutual), from graph

    # --- properties -----------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.backend.params)

    def __len__(self) -> int:
        return len(self.store)

    def info(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "type": self.kind, "params": self.params,
                "count": len(self), "dim": self.dim, "settings": dict(self.settings), "created": self.created,
                "generation": self.generation,
                "graph": None if self.graph is None else {"k": self.graph.k, "exact": self.graph.exact}}

    # --- compatibility --------------------------------------------------------------------
    def check_compatible(self, settings: dict[str, Any]) -> None:
        """Refuse descriptors made with another model, pooling, whitening or dimension."""
        bad = compat_mismatch(self.settings, settings)
        if bad:
            raise IncompatibleDescriptorError(
                "query descriptor was made differently from the index descriptors (" + "; ".join(bad)
                + "); extract the query with the index's settings or rebuild the index"
            )

    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise IncompatibleDescriptorError(
                f"{what} has dimension {v.shape[-1] if v.ndim else '?'} but the index holds {self.dim}-d descriptors"
            )
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{what} contains NaN or infinite values")
        return v

    # --- changes --------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, paths: Sequence[str], *, sizes: Sequence[tuple[int, int] | None] | None = None,
            settings: dict[str, Any] | None = None) -> np.ndarray:
        """Add one descriptor per path; returns the new ids. ValueError if a path is already indexed."""
        v = self._check_vectors(vectors, "added descriptors")
        if len(paths) != v.shape[0]:
            raise ValueError(f"{len(paths)} paths for {v.shape[0]} descriptors")
        if settings:
            self.check_compatible(settings)
        with self.lock.write():
            ids = self.meta.next_ids(len(paths))
            self.meta.insert(ids, [str(p) for p in paths], sizes)
            try:
                self.store.add(ids, v)
                self.backend.on_add(self.store, ids, v)
                self._graph_add(ids)
            except BaseException:
                self.meta.delete(ids)
                if all(int(i) in self.store for i in ids):
                    self.store.remove(ids)
                raise
        return ids

    def remove(self, ids: Sequence[int]) -> None:
        """Remove images by id; KeyError naming the first unknown id (nothing is removed then)."""
        arr = np.unique(np.asarray(list(ids), np.int64))
        with self.lock.write():
            rows = self.store.rows_of(arr)  # raises before any change
            self.store.remove(arr)
            self.meta.delete(arr.tolist())
            self.backend.on_remove(self.store, arr)
            self._graph_remove(rows, arr)

    def update(self, id_: int, vector: np.ndarray, *, path: str | None = None, size: tuple[int, int] | None = None) -> None:
        """Replace the descriptor (and optionally the path) of an indexed image, keeping its id."""
        v = self._check_vectors(vector, "updated descriptor")
        arr = np.asarray([int(id_)], np.int64)
        with self.lock.write():
            rows = self.store.rows_of(arr)
            self.meta.update(int(id_), path, size)
            self.store.remove(arr)
            self.backend.on_remove(self.store, arr)
            self._graph_remove(rows, arr)
            self.store.add(arr, v)
            self.backend.on_add(self.store, arr, v)
            self._graph_add(arr)

    # --- the kNN graph for diffusion ----------------------------------------------------
    def build_graph(self, k: int | None = None, *, exact_max: int = 200_000) -> None:
        """Build the kNN lists of every stored vector (k: default DiffusionParams().k), kept current by
        add/remove/update and saved with each generation; exact up to ``exact_max`` images, else IVF."""
        if k is None:
            from ..rerank.diffusion import DiffusionParams

            k = DiffusionParams().k
        from ..schema import MAX_NEIGHBOURS

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_NEIGHBOURS:
            raise ValueError(f"graph k must be an integer in [1, {MAX_NEIGHBOURS}], got {k!r}")
        with self.lock.write():
            self.graph = KnnGraph.build(self.store.vectors, self.store.ids, int(k), exact_max=exact_max)
            self._affinity.clear()

    def drop_graph(self) -> None:
        with self.lock.write():
            self.graph, self._affinity = None, {}

    def _graph_add(self, ids: np.ndarray) -> None:
        if self.graph is None:
            return
        self._affinity.clear()
        if len(ids) > len(self.store) // 2:  # mostly new: a fresh build is cheaper than merging
            self.graph = KnnGraph.build(self.store.vectors, self.store.ids, self.graph.k)
        else:
            self.graph.on_add(self.store.vectors, self.store.ids, np.asarray(ids, np.int64))

    def _graph_remove(self, rows: np.ndarray, ids: np.ndarray) -> None:
        if self.graph is None:
            return
        self._affinity.clear()
        keep = np.ones(len(self.graph), bool)
        keep[rows] = False
        self.graph.on_remove(keep, self.store.vectors, self.store.ids, ids)

    def affinity(self, k: int, gamma: float, mutual: bool = True):
        """Diffusion affinity W (n x n csr over store rows) from the stored graph; cached until a change."""
        with self.lock.read():
            return self._affinity_locked(k, gamma, mutual)

    def _affinity_locked(self, k: int, gamma: float, mutual: bool):
        if self.graph is None:
            raise ValueError("this index has no kNN graph: build it with Index.build_graph() "
                             "(cbir index build --graph K)")
        key = (int(k), float(gamma), bool(mutual))
        w = self._affinity.get(key)
        if w is None:
            w = self.graph.affinity(self.store.ids, self.store.rows_of, *key)
            self._affinity[key] = w
        return w

    def set_search_params(self, **kw: Any) -> None:
        """Change search-time parameters (ivfpq: nprobe, refine; hnsw: efSearch)."""
        with self.lock.write():
            self.backend.set_search_params(**kw)

    def tune(self, queries: np.ndarray, *, target: float = 0.95, k: int = 100, margin: float = 0.005):
        """Choose the faiss search parameters (type "faiss") for recall@k >= ``target`` on held-out
        ``queries`` (nq, D), with faiss's ParameterSpace (see :mod:`cbir.index.tuning`); the choice and
        what it measured are kept in ``params`` ("search", "tuned") and saved with the index."""
        from .tuning import exact_ground_truth, tune_faiss

        if self.kind != "faiss":
            raise ValueError(f"automatic tuning applies to --type faiss indexes, this one is {self.kind!r}")
        q = self._check_vectors(queries, "tuning queries")
        if not 0.0 < target <= 1.0:
            raise ValueError(f"the recall target must be in (0, 1], got {target}")
        with self.lock.write():
            if len(self.store) == 0:
                raise ValueError("cannot tune an empty index")
            kk = min(int(k), len(self.store))
            rows = exact_ground_truth(self.store.vectors, q, kk)
            tunable, labels_are_rows = self.backend.tunable(self.store)
            result = tune_faiss(tunable, q, rows if labels_are_rows else self.store.ids[rows],
                                target=target, margin=margin)
            self.backend.params["search"] = result.search
            self.backend.params["tuned"] = {key: v for key, v in result.to_dict().items() if key != "curve"}
        return result

    def tune_on_sample(self, *, target: float = 0.95, k: int = 100, nq: int = 1000, seed: int = 0):
        """:meth:`tune` with ``nq`` stored vectors (a seeded random sample) as the queries.

        Not held out: each such query finds itself, in the exact and the approximate top-k alike. It is
        what ``cbir index build --type faiss`` uses when it has no other queries; for held-out tuning
        pass your own queries to :meth:`tune`.
        """
        n = len(self)
        pick = np.sort(np.random.default_rng(seed).choice(n, min(nq, n), replace=False))
        return self.tune(self.store.vectors[pick], target=target, k=k)

    # --- reading --------------------------------------------------------------------------
    def get(self, id_: int) -> ImageRecord:
        with self.lock.read():
            return self.meta.get(id_)

    def vector(self, id_: int) -> np.ndarray:
        with self.lock.read():
            return self.store.vectors[int(self.store.rows_of(np.asarray([id_]))[0])].copy()

    def id_of_path(self, path: str) -> int | None:
        with self.lock.read():
            return self.meta.id_of_path(str(path))

    def records(self, limit: int | None = None, offset: int = 0) -> list[ImageRecord]:
        with self.lock.read():
            return self.meta.records(limit, offset)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,), vectors (N, D)) copies of everything indexed, for re-ranking."""
        with self.lock.read():
            return self.store.ids.copy(), self.store.vectors.copy()

    def search_vectors(self, queries: np.ndarray, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: (scores (nq, k'), ids (nq, k')), best first, k' = min(k, len)."""
        q = self._check_vectors(queries, "query descriptor")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        with self.lock.read():
            return self.backend.search(self.store, q, int(k))

    def search(self, queries: np.ndarray, k: int = 20, *, settings: dict[str, Any] | None = None,
               exclude: Sequence[int] | None = None) -> list[list[Hit]]:
        """Top-k hits per query row (one list per row), best first; ``settings`` of the query are checked."""
        if settings:
            self.check_compatible(settings)
        excl = set(int(i) for i in exclude or [])
        q = self._check_vectors(queries, "query descriptor")
        with self.lock.read():
            scores, ids = self.backend.search(self.store, q, int(k) + len(excl))
            paths = self.meta.paths(int(i) for i in ids.ravel() if i >= 0)
        out = []
        for srow, irow in zip(scores, ids):
            hits = [Hit(int(i), paths[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0 and int(i) not in excl]
            out.append(hits[:k])
        return out

    # --- re-ranking on the stored vectors and graph ---------------------------------------
    def search_rerank(self, queries: np.ndarray, k: int, rerank: "Rerank", *,
                      settings: dict[str, Any] | None = None) -> tuple[list[list[Hit]], dict]:
        """Top-k hits per query after re-ranking with ``rerank`` (:class:`cbir.rerank.compose.Rerank`);
        returns (hits per query row, the ``applied`` dict of Rerank.apply).

        QE and diffusion run on the stored vectors without copying the matrix: the search structure
        gives each query's neighbours (exact or approximate, as the index is), QE combines the stored
        vectors of its top ``qe`` (:func:`cbir.rerank.qe.alpha_qe` on those rows), and truncated
        diffusion (Iscen et al.) solves on the subgraph of the query's top-``trunc`` region of the
        stored kNN graph (:meth:`build_graph`). Full diffusion (``trunc`` 0 or >= n) uses
        :func:`cbir.rerank.diffusion.diffusion_scores` with the stored graph. Whitening and DBA change
        every database vector, so with them the whole matrix goes through ``rerank.apply`` (build
        the index from whitened / DBA descriptors instead to keep searches light).
        With an exact index the result equals ``rerank.apply(q, all vectors)``.
        """
        if settings:
            self.check_compatible(settings)
        q = self._check_vectors(queries, "query descriptor")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        rerank.check()
        if getattr(rerank, "verify", None) is not None:
            raise ValueError("spatial verification needs local features and a verifier: search with "
                             "cbir.pipeline.search_index(index, q, k, rerank, verifier=...)")
        with self.lock.read():
            n = len(self.store)
            if n == 0:
                return [[] for _ in q], {}
            if rerank.whiten or rerank.dba > 1:
                scores, applied = rerank.apply(q, self.store.vectors)
                order = np.argsort(-scores, axis=1, kind="stable")[:, :min(int(k), n)]
                ids = self.store.ids[order]
                out_s = np.take_along_axis(scores, order, 1)
            else:
                out_s, ids, applied = self._rerank_stored(q, int(k), rerank)
            paths = self.meta.paths(int(i) for i in ids.ravel() if i >= 0)
        hits = [[Hit(int(i), paths[int(i)], float(sc)) for sc, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(out_s, ids)]
        return hits, applied

    def _rerank_stored(self, q: np.ndarray, k: int, rerank: "Rerank") -> tuple[np.ndarray, np.ndarray, dict]:
        """QE + diffusion on stored vectors/graph (read lock held) -> (scores (nq, k'), ids (nq, k'), applied)."""
        from ..rerank.compose import ALPHA
        from ..rerank.qe import alpha_qe

        n = len(self.store)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        applied: dict[str, Any] = {}
        if rerank.qe > 0:
            qk = min(rerank.qe, n)
            s, ids = self.backend.search(self.store, q, qk)
            alpha = ALPHA if rerank.alpha_qe is None else float(rerank.alpha_qe)
            q = np.concatenate([
                alpha_qe(q[i:i + 1], self.store.vectors[self.store.rows_of(ids[i][ids[i] >= 0])], qk, alpha=alpha,
                         scores=s[i:i + 1, ids[i] >= 0])
                for i in range(len(q))]).astype(np.float32)
            applied["qe"] = {"k": int(rerank.qe), "alpha": alpha, "kind": "alpha-qe" if alpha else "average"}
        p = rerank.diffusion_for(n)  # the given parameters; the rest follow the database size
        if p is None:
            s, ids = self.backend.search(self.store, q, min(k, n))
            return s, ids, applied
        truncated = 0 < p.trunc < n
        applied["diffusion"] = p.to_dict() | {"truncated": truncated, "graph": "stored" if self.graph else "built"}
        if self.graph is not None and p.k <= self.graph.k:
            w = self._affinity_locked(p.k, p.gamma, p.mutual)
        else:  # no stored graph (or a smaller one): build it for this call
            from ..rerank.diffusion import knn_graph

            w = knn_graph(self.store.vectors, k=p.k, gamma=p.gamma, mutual=p.mutual)
        if not truncated:
            from ..rerank.diffusion import diffusion_scores

            scores = diffusion_scores(q, self.store.vectors, p, graph=w)
            kk = min(k, n)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
            return np.take_along_axis(scores, order, 1), self.store.ids[order], applied
        from ..rerank.diffusion import final_scores, truncated_diffusion

        sims, region_ids = self.backend.search(self.store, q, p.trunc)
        valid = region_ids >= 0
        if not valid.all():  # approximate structures may return fewer: pad with the best one (no effect on top-k)
            region_ids = np.where(valid, region_ids, region_ids[:, :1])
            sims = np.where(valid, sims, -np.inf)
        regions = self.store.rows_of(region_ids)
        f = truncated_diffusion(np.where(valid, sims, 0.0), regions, w, p)
        # the final scores of diffusion_scores on the region: items outside it have f = 0 and a smaller
        # similarity, so they rank after every region item and the top-k (k <= R) lies in the region
        final = np.where(valid, final_scores(f, np.where(valid, sims, 0.0), p), -np.inf).astype(np.float32)
        kk = min(k, p.trunc)
        order = np.argsort(-final, axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(final, order, 1), np.take_along_axis(region_ids, order, 1), applied

    # --- persistence (cbir.index.persist) ------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save atomically as a new generation of the folder ``path`` (see :mod:`cbir.index.persist`).

        StaleIndexError if this copy was loaded from ``path`` and another writer has saved a newer
        generation since (saving would lose that change; use :func:`cbir.index.open_for_write`)."""
        with self.lock.read():
            root, number = persist.save_generation(self, Path(path))
        self.path, self.generation = root, number
        return root

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "auto", verify: bool = True, mmap: bool = False,
             digest: Any = None) -> "Index":
        """Open a saved index; FormatError if it is not one, is of another version, or is damaged.
        ``mmap``: vectors memory-mapped (read-only); ``digest``: the sha256 function used to verify
        the files (e.g. a :class:`cbir.cache.digest.DigestMemo`'s ``digest``: each file hashed once)."""
        return persist.load_index(cls, Path(path), device=device, verify=verify, mmap=mmap, digest=digest)

    def reload_if_stale(self) -> bool:
        """For readers: if another writer saved a newer generation of ``self.path``, load it in place.

        Returns True when the index was reloaded. Searches running meanwhile finish on the old data;
        the swap happens under the write lock. An index never saved (``path`` None) is never stale.
        """
        if self.path is None or latest_generation(self.path) <= self.generation:
            return False
        fresh = Index.load(self.path, device=self.backend.device)
        with self.lock.write():
            self._take(fresh)
        return True

    def _take(self, other: "Index") -> None:
        """Adopt everything of ``other`` (a freshly loaded copy) except this object's lock."""
        self.dim, self.settings, self.store, self.meta = other.dim, other.settings, other.store, other.meta
        self.backend, self.created = other.backend, other.created
        self.graph, self._affinity = other.graph, {}
        self.path, self.generation = other.path, other.generation


