"""``Index``: a persistent, searchable collection of image descriptors.

On disk an index is a folder::

    INDEX/
      manifest.json        format stamp, settings that made the descriptors, search structure,
                           the current generation, and size + sha256 of each of its files
      g000007-3fa2c1/      the current generation: vectors.npy, ids.npy, meta.sqlite [, faiss.index]

A save writes a complete new generation folder (every file fsync'ed, the folder renamed into
place and fsync'ed), then switches ``manifest.json`` atomically (temporary file, fsync, rename),
then deletes older generations. A crash at any point leaves ``manifest.json`` naming a complete
generation: the previous index or the new one, never a mixture. Loading checks the format stamp,
the sizes and checksums, and that vectors, ids, metadata and faiss structure agree, and raises
:class:`cbir.fileio.FormatError` otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .. import __version__
from ..descriptors import COMPAT_KEYS  # settings that must agree between the index and a query
from ..fileio import FormatError, atomic_write_json, check_format, fsync_dir, read_json
from .backends import KINDS, Backend, check_params, make_backend
from .store import ImageRecord, MetadataDB, VectorStore

FORMAT = "cbir-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_GEN_DIR = re.compile(r"^(\.tmp-)?g\d{6}-[0-9a-f]{6}$")
_TMP_MANIFEST = re.compile(r"^\.manifest\.json\..+\.tmp$")  # cbir.fileio.atomic_open's temporary name
VECTORS, IDS, SQLITE = "vectors.npy", "ids.npy", "meta.sqlite"



class StaleIndexError(RuntimeError):
    """Saving would overwrite a newer generation written by another writer (a lost update)."""


class IncompatibleDescriptorError(ValueError):
    """A query descriptor was made with other settings (model, pooling, whitening, dim) than the index."""


@dataclass(frozen=True)
class Hit:
    """One search result: the image id, its path, and the inner-product score (cosine for unit vectors)."""

    id: int
    path: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "score": self.score}


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


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(file: Path) -> None:
    with open(file, "rb+") as fh:
        os.fsync(fh.fileno())


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
                "count": len(self), "dim": self.dim, "settings": dict(self.settings), "created": self.created}

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
            self.store.rows_of(arr)  # raises before any change
            self.store.remove(arr)
            self.meta.delete(arr.tolist())
            self.backend.on_remove(self.store, arr)

    def update(self, id_: int, vector: np.ndarray, *, path: str | None = None, size: tuple[int, int] | None = None) -> None:
        """Replace the descriptor (and optionally the path) of an indexed image, keeping its id."""
        v = self._check_vectors(vector, "updated descriptor")
        arr = np.asarray([int(id_)], np.int64)
        with self.lock.write():
            self.store.rows_of(arr)
            self.meta.update(int(id_), path, size)
            self.store.remove(arr)
            self.backend.on_remove(self.store, arr)
            self.store.add(arr, v)
            self.backend.on_add(self.store, arr, v)

    def set_search_params(self, **kw: Any) -> None:
        """Change search-time parameters (ivfpq: nprobe, refine; hnsw: efSearch)."""
        with self.lock.write():
            self.backend.set_search_params(**kw)

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

    # --- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save atomically as a new generation of the folder ``path`` (see module doc); returns it."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        previous = _read_manifest_or_none(root)
        latest = int(previous.get("generation_number", 0)) if previous else 0
        if self.path is not None and _same_folder(self.path, root) and latest > self.generation:
            raise StaleIndexError(
                f"{root} was changed by another writer (generation {latest}, this copy was loaded at "
                f"{self.generation}); saving would lose that change: reload it (cbir.index.open_for_write does)"
            )
        number = latest + 1
        gen = f"g{number:06d}-{uuid.uuid4().hex[:6]}"
        tmp = root / f".tmp-{gen}"
        with self.lock.read():
            tmp.mkdir()
            try:
                np.save(tmp / VECTORS, np.ascontiguousarray(self.store.vectors, np.float32), allow_pickle=False)
                np.save(tmp / IDS, np.ascontiguousarray(self.store.ids, np.int64), allow_pickle=False)
                self.meta.save(tmp / SQLITE)
                names = [VECTORS, IDS, SQLITE] + self.backend.save(self.store, tmp)
                files = {}
                for name in names:
                    _fsync_file(tmp / name)
                    files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                fsync_dir(tmp)
                os.replace(tmp, root / gen)
                fsync_dir(root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "generation": gen,
                "generation_number": number,
                "type": self.kind,
                "params": self.params,
                "dim": self.dim,
                "count": len(self.store),
                "settings": self.settings,
                "files": files,
                "created": self.created,
                "saved": time.time(),
                "cbir_version": __version__,
            }
        atomic_write_json(root / MANIFEST, manifest)
        self.path, self.generation = root, number
        for old in root.iterdir():  # best effort: older generations, abandoned temporary folders/files
            if old.is_dir() and old.name != gen and _GEN_DIR.match(old.name):
                shutil.rmtree(old, ignore_errors=True)
            elif old.is_file() and _TMP_MANIFEST.match(old.name):  # a killed manifest switch
                old.unlink(missing_ok=True)
        return root

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "auto", verify: bool = True) -> "Index":
        """Open a saved index; FormatError if it is not one, is of another version, or is damaged."""
        root = Path(path)
        for attempt in range(3):  # a concurrent save may delete the generation we just read of
            manifest = _read_manifest(root)
            try:
                return cls._load_generation(root, manifest, device, verify)
            except FileNotFoundError as exc:
                if attempt == 2 or _read_manifest(root).get("generation") == manifest.get("generation"):
                    raise FormatError(f"{root} is incomplete: {exc}") from exc
        raise AssertionError("unreachable")

    @classmethod
    def _load_generation(cls, root: Path, manifest: dict, device: str, verify: bool) -> "Index":
        where = root / MANIFEST
        try:
            gen = root / str(manifest["generation"])
            kind, dim, files = manifest["type"], int(manifest["dim"]), dict(manifest["files"])
            params, settings, count = dict(manifest["params"]), dict(manifest["settings"]), int(manifest["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{where} is incomplete or damaged: {exc!r}") from exc
        if kind not in KINDS:
            raise FormatError(f"{where}: unknown index type {kind!r}")
        for name in (VECTORS, IDS, SQLITE):
            if name not in files:
                raise FormatError(f"{where} lists no {name}")
        for name, desc in files.items():
            file = gen / name
            if not file.is_file():
                raise FileNotFoundError(f"index file missing: {file}")
            if file.stat().st_size != desc.get("bytes"):
                raise FormatError(f"{file} has {file.stat().st_size} bytes, the manifest says {desc.get('bytes')}: damaged or truncated")
            if verify and _sha256(file) != desc.get("sha256"):
                raise FormatError(f"{file} does not match its checksum in the manifest: the index is damaged")
        try:
            vectors = np.load(gen / VECTORS, allow_pickle=False)
            ids = np.load(gen / IDS, allow_pickle=False)
        except ValueError as exc:
            raise FormatError(f"{gen}: damaged array: {exc}") from exc
        if vectors.shape != (count, dim) or ids.shape != (count,) or ids.dtype != np.int64:
            raise FormatError(f"{gen}: vectors {vectors.shape} / ids {ids.shape} do not match the manifest ({count} x {dim})")
        try:
            params = check_params(kind, params, dim)
        except ValueError as exc:
            raise FormatError(f"{where}: {exc}") from exc
        index = cls(dim, kind, params, settings, device)
        index.created = float(manifest.get("created", time.time()))
        try:
            index.store = VectorStore(dim, ids, vectors)
        except ValueError as exc:
            raise FormatError(f"{gen}: {exc}") from exc
        index.meta = MetadataDB.load(gen / SQLITE)
        if not np.array_equal(np.sort(ids), index.meta.all_ids()):
            raise FormatError(f"{gen}: the metadata database and the vectors list different image ids")
        index.backend.load(index.store, gen)
        index.path, index.generation = root, int(manifest.get("generation_number", 0))
        return index

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
        self.path, self.generation = other.path, other.generation


def latest_generation(path: str | os.PathLike[str]) -> int:
    """The generation number named by ``path``/manifest.json (reads that file only).

    FileNotFoundError when there is no index at ``path``; FormatError when it is not one.
    """
    manifest = _read_manifest(Path(path))
    try:
        return int(manifest.get("generation_number", 0))
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{Path(path) / MANIFEST}: bad generation_number") from exc


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _read_manifest_or_none(root: Path) -> dict | None:
    try:
        return _read_manifest(root)
    except (FileNotFoundError, FormatError):
        return None


def _read_manifest(root: Path) -> dict:
    if not root.exists():
        raise FileNotFoundError(f"index not found: {root}")
    if not root.is_dir():
        raise FormatError(f"{root} is not an index folder (expected a folder with {MANIFEST})")
    manifest = read_json(root / MANIFEST, what="index manifest")
    if not isinstance(manifest, dict):
        raise FormatError(f"{root / MANIFEST} is not an index manifest")
    check_format(manifest, FORMAT, (FORMAT_VERSION,), root / MANIFEST)
    return manifest
