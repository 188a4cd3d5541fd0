"""Search structures behind one interface: exact (torch), faiss IVF-PQ, faiss HNSW.

A backend is an *acceleration structure* derived from the index's stored vectors (the truth,
kept by :class:`cbir.index.store.VectorStore`). It answers ``search(queries, k) -> (scores, ids)``
with ids of the store (int64, -1 where fewer than k exist) and inner-product scores, best first,
and follows the store's additions and removals: incrementally where faiss can (IVF add/remove,
HNSW add), by a rebuild where it cannot (HNSW remove).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import FormatError
from .exact import database_tensor, exact_topk, numpy_search, resolve_device
from .store import VectorStore

KINDS = ("exact", "ivfpq", "hnsw", "faiss")

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "exact": {},
    # nlist inverted lists, PQ with m sub-quantisers of nbits bits; nprobe lists visited per query;
    # refine: re-score refine*k PQ candidates with the stored exact vectors (0 = off).
    "ivfpq": {"nlist": 1024, "m": 64, "nbits": 8, "nprobe": 32, "refine": 8},
    # M links per node, efConstruction/efSearch beam widths at build/search time.
    "hnsw": {"M": 32, "efConstruction": 200, "efSearch": 128},
    # any faiss index_factory string (e.g. "IVF16384_HNSW32,PQ64x4fs,RFlat"); ``search``: faiss
    # ParameterSpace settings "nprobe=32,quantizer_efSearch=64,k_factor_rf=4" (chosen by
    # cbir.index.tuning for a recall target); ``tuned``: what the tuning measured (or None).
    "faiss": {"factory": "IVF1024,PQ64x4fs,RFlat", "search": "", "tuned": None},
}

SEARCH_TIME_PARAMS = {"ivfpq": ("nprobe", "refine"), "hnsw": ("efSearch",), "exact": (),
                      "faiss": ("search", "nprobe", "efSearch", "quantizer_efSearch", "k_factor_rf", "k_factor")}


def check_params(kind: str, params: dict[str, Any] | None, dim: int) -> dict[str, Any]:
    """Complete ``params`` with the defaults of ``kind`` and check them; ValueError naming the bad one."""
    if kind not in KINDS:
        raise ValueError(f"unknown index type {kind!r}; choose one of {', '.join(KINDS)}")
    full = dict(DEFAULT_PARAMS[kind])
    if kind == "faiss":
        return _check_faiss_params(full, params or {})
    for key, value in (params or {}).items():
        if value is None:
            continue
        if key not in full:
            raise ValueError(f"index type {kind!r} has no parameter {key!r} (it has: {', '.join(full) or 'none'})")
        full[key] = int(value)
    for key, value in full.items():
        if value < (0 if key == "refine" else 1):
            raise ValueError(f"{kind} parameter {key} must be positive, got {value}")
    if kind == "ivfpq" and dim % full["m"]:
        raise ValueError(f"ivfpq: the dimension {dim} must be a multiple of m={full['m']}")
    return full


def _check_faiss_params(full: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    for key, value in params.items():
        if key not in full:
            raise ValueError(f"index type 'faiss' has no parameter {key!r} (it has: {', '.join(full)})")
        if value is not None:
            full[key] = value
    if not isinstance(full["factory"], str) or not full["factory"].strip():
        raise ValueError("index type 'faiss' needs a factory string, e.g. 'IVF4096_HNSW32,PQ64x4fs,RFlat'")
    if not isinstance(full["search"], str):
        raise ValueError(f"faiss search parameters must be a string like 'nprobe=32', got {full['search']!r}")
    if full["tuned"] is not None and not isinstance(full["tuned"], dict):
        raise ValueError("faiss 'tuned' must be a dict or None")
    full["search"] = format_search(parse_search(full["search"]))
    return full


def parse_search(text: str) -> dict[str, float]:
    """faiss ParameterSpace string "nprobe=32,quantizer_efSearch=64" -> {"nprobe": 32.0, ...}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad faiss search parameter {part!r} (expected name=number)") from None
        if not eq or not name.strip():
            raise ValueError(f"bad faiss search parameter {part!r} (expected name=number)")
    return out


def format_search(values: dict[str, float]) -> str:
    return ",".join(f"{k}={int(v) if float(v).is_integer() else v}" for k, v in values.items())


@dataclass
class Backend:
    """Base: exact search over the store on CPU (float32) or GPU (float16)."""

    kind: str
    dim: int
    params: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"

    def __post_init__(self) -> None:
        self._db = None  # cached database tensor (exact) / faiss index (others)

    # --- following the store -------------------------------------------------------------
    def on_add(self, store: VectorStore, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._db = None

    def on_remove(self, store: VectorStore, ids: np.ndarray) -> None:
        self._db = None

    def set_search_params(self, **kw: Any) -> None:
        allowed = SEARCH_TIME_PARAMS[self.kind]
        for key, value in kw.items():
            if value is None:
                continue
            if key not in allowed:
                raise ValueError(f"{self.kind} has no search-time parameter {key!r} (it has: {', '.join(allowed) or 'none'})")
            self.params[key] = int(value)

    # --- searching ------------------------------------------------------------------------
    def search(self, store: VectorStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._db is None and numpy_search(self.device, len(store), self.dim):  # no torch import
            from ..topk import chunked_topk

            if len(store) == 0:
                return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
            scores, rows = chunked_topk(np.asarray(queries, np.float32), store.vectors, k)
            return scores, store.ids[rows] if rows.size else rows
        if self._db is None:
            self._db = database_tensor(store.vectors, resolve_device(self.device))
        scores, rows = exact_topk(queries, self._db, k)
        return scores, store.ids[rows] if rows.size else rows

    # --- persistence (only faiss structures have a file) ----------------------------------
    def save(self, store: VectorStore, path: Path) -> list[str]:
        return []

    def load(self, store: VectorStore, path: Path) -> None:
        return None


class FaissBackend(Backend):
    """Common parts of the faiss structures: lazy (re)build, ``faiss.index`` file, refinement."""

    FILE = "faiss.index"

    def _build(self, store: VectorStore):  # pragma: no cover - overridden
        raise NotImplementedError

    def _ensure(self, store: VectorStore):
        if self._db is None:
            self._db = self._build(store)
        return self._db

    def on_add(self, store: VectorStore, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self._db is not None:
            self._db.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def save(self, store: VectorStore, path: Path) -> list[str]:
        import faiss

        faiss.write_index(self._ensure(store), str(path / self.FILE))
        return [self.FILE]

    def load(self, store: VectorStore, path: Path) -> None:
        import faiss

        file = path / self.FILE
        if not file.is_file():
            raise FormatError(f"{path}: missing {self.FILE}")
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as exc:
            raise FormatError(f"{file} is damaged or not a faiss index: {exc}") from exc
        if index.ntotal != len(store) or index.d != self.dim:
            raise FormatError(
                f"{file} holds {index.ntotal} vectors of dimension {index.d}, "
                f"but the index lists {len(store)} of dimension {self.dim}"
            )
        self._db = index

    def _faiss_search(self, index, queries: np.ndarray, k: int):  # pragma: no cover - overridden
        raise NotImplementedError

    def search(self, store: VectorStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(store) == 0:
            nq = queries.shape[0]
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        index = self._ensure(store)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        refine = int(self.params.get("refine", 0))
        kk = min(k, len(store))
        scores, ids = self._faiss_search(index, q, kk * refine if refine else kk)
        if refine:
            scores, ids = refine_exact(store, q, ids, kk)
        return scores[:, :kk].astype(np.float32), ids[:, :kk].astype(np.int64)


def refine_exact(store: VectorStore, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate ids (nq, c) with the exact stored vectors: s_ij = <q_i, x_cand_ij>; keep the best k."""
    valid = cand >= 0
    rows = store.rows_of(np.where(valid, cand, store.ids[0]))
    exact = np.empty(cand.shape, np.float32)
    step = max(1, (1 << 22) // max(cand.shape[1] * store.dim, 1))  # gather at most ~16 MB of vectors at once
    for s in range(0, len(queries), step):
        part = rows[s:s + step]
        gathered = store.vectors[part.ravel()].reshape(part.shape + (store.dim,))  # (b, c, D)
        exact[s:s + step] = np.einsum("bcd,bd->bc", gathered, queries[s:s + step])
    exact = np.where(valid, exact, -np.inf).astype(np.float32)
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(np.where(valid, cand, -1), order, axis=1)
    return np.take_along_axis(exact, order, axis=1), ids


class IVFPQBackend(FaissBackend):
    """faiss ``IndexIVFPQ`` (inner product): nlist coarse cells, PQ codes of m x nbits bits."""

    def min_train(self) -> int:
        return max(self.params["nlist"], 2 ** self.params["nbits"])

    def _build(self, store: VectorStore):
        import faiss

        p = self.params
        n = len(store)
        if n < self.min_train():
            raise ValueError(
                f"ivfpq with nlist={p['nlist']}, nbits={p['nbits']} needs at least {self.min_train()} images to "
                f"train, the index has {n}; use --type exact (best below ~100k images) or a smaller --nlist/--nbits"
            )
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
        sample = store.vectors
        limit = 64 * max(p["nlist"], 2 ** p["nbits"])
        if n > limit:  # 64 points per centroid train k-means well (faiss asks for >= 39); more only costs time
            pick = np.random.default_rng(0).choice(n, limit, replace=False)
            sample = store.vectors[np.sort(pick)]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.add_with_ids(np.ascontiguousarray(store.vectors, dtype=np.float32), store.ids)
        return index

    def on_remove(self, store: VectorStore, ids: np.ndarray) -> None:
        if self._db is not None:
            self._db.remove_ids(ids.astype(np.int64))

    def _faiss_search(self, index, queries, k):
        import faiss

        params = faiss.SearchParametersIVF(nprobe=int(self.params["nprobe"]))
        return index.search(queries, k, params=params)


class HNSWBackend(FaissBackend):
    """faiss ``IndexHNSWFlat`` (inner product) in an ``IndexIDMap``; removal rebuilds the graph."""

    def _build(self, store: VectorStore):
        import faiss

        hnsw = faiss.IndexHNSWFlat(self.dim, self.params["M"], faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.params["efConstruction"]
        index = faiss.IndexIDMap(hnsw)
        if len(store):
            index.add_with_ids(np.ascontiguousarray(store.vectors, dtype=np.float32), store.ids)
        return index

    def on_remove(self, store: VectorStore, ids: np.ndarray) -> None:
        self._db = None  # HNSW graphs cannot drop nodes: rebuild on next use

    def _faiss_search(self, index, queries, k):
        import faiss

        params = faiss.SearchParametersHNSW(efSearch=max(int(self.params["efSearch"]), k))
        return index.search(queries, k, params=params)


class FactoryBackend(FaissBackend):
    """Any faiss ``index_factory`` string (inner product), with ParameterSpace search settings.

    Structures that take ids natively (IVF, OPQ+IVF) hold the image ids and remove incrementally.
    Others (a refine stage ``RFlat``/``Refine(SQfp16)``, HNSW, Flat) are wrapped in an
    ``IndexIDMap2`` whose internal numbers are the store's rows (both append in the same order);
    a removal empties the trained structure (``reset``, training kept) and re-adds the store.
    ``tunable``: the index the faiss ParameterSpace acts on, and ``labels_are_rows`` says whether
    its results are store rows (wrapped) or image ids.
    """

    def _build(self, store: VectorStore):
        import faiss

        index = faiss.index_factory(self.dim, self.params["factory"], faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            n = len(store)
            limit = self.train_size(index)
            if n < self.min_train(index):
                raise ValueError(
                    f"faiss {self.params['factory']!r} needs at least {self.min_train(index)} images to train, the "
                    f"index has {n}; use fewer inverted lists (IVFn) or --type exact"
                )
            sample = store.vectors
            if n > limit:
                pick = np.sort(np.random.default_rng(0).choice(n, limit, replace=False))
                sample = store.vectors[pick]
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index = self._wrap(index)
        self._add_all(index, store)
        self._apply_search(index)
        return index

    @staticmethod
    def _ivf(index):
        import faiss

        return faiss.try_extract_index_ivf(index)

    def min_train(self, index) -> int:
        ivf = self._ivf(index)
        return int(ivf.nlist) if ivf is not None else 256

    def train_size(self, index) -> int:
        """Training sample: 50 points per inverted list (faiss asks >= 39), at least 2^16 for PQ codebooks."""
        ivf = self._ivf(index)
        return max(50 * int(ivf.nlist) if ivf is not None else 0, 1 << 16)

    def _wrap(self, index):
        import faiss

        takes_ids = self._ivf(index) is not None and not isinstance(faiss.downcast_index(index), faiss.IndexRefine)
        return index if takes_ids else faiss.IndexIDMap2(index)

    @staticmethod
    def wrapped(index) -> bool:
        import faiss

        return isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap))

    def tunable(self, store: VectorStore):
        """(faiss index the ParameterSpace sets, True if its labels are store rows else image ids)."""
        import faiss

        index = self._ensure(store)
        if self.wrapped(index):
            return faiss.downcast_index(index.index), True
        return index, False

    def _add_all(self, index, store: VectorStore) -> None:
        step = 1 << 16
        for s in range(0, len(store), step):
            index.add_with_ids(np.ascontiguousarray(store.vectors[s:s + step], dtype=np.float32), store.ids[s:s + step])

    def _apply_search(self, index) -> None:
        import faiss

        if self.params["search"]:
            inner = faiss.downcast_index(index.index) if self.wrapped(index) else index
            try:
                faiss.ParameterSpace().set_index_parameters(inner, self.params["search"])
            except RuntimeError as exc:
                raise ValueError(f"faiss search parameters {self.params['search']!r} do not apply to "
                                 f"{self.params['factory']!r}: {str(exc).splitlines()[-1]}") from None

    def set_search_params(self, **kw: Any) -> None:
        values = parse_search(self.params["search"])
        for key, value in kw.items():
            if value is None:
                continue
            if key not in SEARCH_TIME_PARAMS["faiss"]:
                raise ValueError(f"faiss has no search-time parameter {key!r}")
            if key == "search":
                values.update(parse_search(str(value)))
            else:
                values["quantizer_efSearch" if key == "efSearch" and "IVF" in self.params["factory"] else key] = value
        self.params["search"] = format_search(values)
        if self._db is not None:
            self._apply_search(self._db)

    def on_remove(self, store: VectorStore, ids: np.ndarray) -> None:
        if self._db is None:
            return
        if self.wrapped(self._db):  # internal numbers are rows: empty (training kept) and re-add the store
            self._db.reset()
            self._add_all(self._db, store)
        else:
            self._db.remove_ids(ids.astype(np.int64))

    def load(self, store: VectorStore, path: Path) -> None:
        super().load(store, path)
        self._apply_search(self._db)

    def _faiss_search(self, index, queries, k):
        return index.search(queries, k)


def make_backend(kind: str, dim: int, params: dict[str, Any], device: str = "auto") -> Backend:
    params = check_params(kind, params, dim)
    cls = {"exact": Backend, "ivfpq": IVFPQBackend, "hnsw": HNSWBackend, "faiss": FactoryBackend}[kind]
    return cls(kind=kind, dim=dim, params=params, device=device)
