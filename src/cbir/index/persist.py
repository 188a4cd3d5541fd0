"""An index on disk: manifest, generations, checksums.

On disk an index is a folder::

    INDEX/
      manifest.json        format stamp, settings that made the descriptors, search structure,
                           the current generation, and size + sha256 of each of its files
      .writer.lock         the writers' lock (cbir.index.writer)
      g000007-3fa2c1/      the current generation: vectors.npy, ids.npy, meta.sqlite
                           [, faiss.index] [, graph_ids.npy, graph_sims.npy]

A save writes a complete new generation folder (every file fsync'ed, the folder renamed into
place and fsync'ed), then switches ``manifest.json`` atomically (temporary file, fsync, rename),
then deletes older generations. A crash at any point leaves ``manifest.json`` naming a complete
generation: the previous index or the new one, never a mixture. Loading checks the format stamp,
the sizes and checksums, and that vectors, ids, metadata, faiss structure and graph agree, and
raises :class:`cbir.fileio.FormatError` otherwise. Generation numbers only grow; a reader compares
its own with :func:`latest_generation` to know whether it is stale.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

from pydantic import field_validator
from pydantic_core import PydanticCustomError

from ..fileio import FormatError, atomic_write_json, check_format, fsync_dir, read_json, sha256_file
from ..schema import MAX_DIM, MAX_NEIGHBOURS, MAX_ROWS, Bool, FileName, Float, Int, JsonObject, Schema, Sha256, Str, show
from .backends import KINDS, check_params
from .graph import KnnGraph
from .store import MetadataDB, VectorStore

if TYPE_CHECKING:
    from .index import Index

FORMAT = "cbir-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_GEN_DIR = re.compile(r"^(\.tmp-)?g\d{6}-[0-9a-f]{6}$")
_GEN_NAME = re.compile(r"^g\d{6}-[0-9a-f]{6}$")
_TMP_MANIFEST = re.compile(r"^\.manifest\.json\..+\.tmp$")  # cbir.fileio.atomic_open's temporary name
VECTORS, IDS, SQLITE = "vectors.npy", "ids.npy", "meta.sqlite"


class FileRecord(Schema):
    """Size and checksum of one file of a generation."""

    bytes: Int(ge=0, le=1 << 50)
    sha256: Sha256


class GraphInfo(Schema):
    """The stored kNN graph: neighbours per image and whether the lists are exact."""

    k: Int(ge=1, le=MAX_NEIGHBOURS)
    exact: Bool = True


class IndexManifest(Schema):
    """``manifest.json`` of an index folder, format ``cbir-index`` v1 (module doc). ``generation`` is
    the plain name of a generation folder inside the index folder (``gNNNNNN-xxxxxx``: never a path,
    never ``..``); ``files`` are plain names inside it; ``params`` are checked by the backend
    (:func:`cbir.index.backends.check_params`), ``settings`` are plain JSON. Unknown keys are refused."""

    format: Literal["cbir-index"]
    format_version: Literal[1]
    generation: Str
    generation_number: Int(ge=0, le=MAX_ROWS)
    type: Str
    params: JsonObject
    dim: Int(ge=1, le=MAX_DIM)
    count: Int(ge=0, le=MAX_ROWS)
    settings: JsonObject
    files: dict[FileName, FileRecord]
    created: Float() | None = None
    saved: Float() | None = None
    cbir_version: Str | None = None
    graph: GraphInfo | None = None

    @field_validator("generation")
    @classmethod
    def _plain_generation(cls, v: str) -> str:
        if not _GEN_NAME.match(v):
            raise PydanticCustomError("cbir", "must name a generation folder inside the index folder, "
                                      "gNNNNNN-xxxxxx (got {got})", {"got": show(v)})
        return v

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in KINDS:
            raise PydanticCustomError("cbir", "must be one of {kinds} (got {got})",
                                      {"kinds": ", ".join(KINDS), "got": show(v)})
        return v


def _version() -> str:
    from .. import __version__  # read on first use (cbir.__getattr__): opening an index does not pay for it

    return __version__


class StaleIndexError(RuntimeError):
    """Saving would overwrite a newer generation written by another writer (a lost update)."""


def _fsync_file(file: Path) -> None:
    with open(file, "rb+") as fh:
        os.fsync(fh.fileno())


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def save_generation(index: "Index", root: Path) -> tuple[Path, int]:
    """Write ``index`` as a new generation of ``root`` (module doc); returns (root, generation number).

    The caller holds the index's read lock (and, for a shared folder, the writer lock)."""
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest_or_none(root)
    latest = int(previous.get("generation_number", 0)) if previous else 0
    if index.path is not None and _same_folder(index.path, root) and latest > index.generation:
        raise StaleIndexError(
            f"{root} was changed by another writer (generation {latest}, this copy was loaded at "
            f"{index.generation}); saving would lose that change: reload it (cbir.index.open_for_write does)"
        )
    number = latest + 1
    gen = f"g{number:06d}-{uuid.uuid4().hex[:6]}"
    tmp = root / f".tmp-{gen}"
    tmp.mkdir()
    try:
        np.save(tmp / VECTORS, np.ascontiguousarray(index.store.vectors, np.float32), allow_pickle=False)
        np.save(tmp / IDS, np.ascontiguousarray(index.store.ids, np.int64), allow_pickle=False)
        index.meta.save(tmp / SQLITE)
        names = [VECTORS, IDS, SQLITE] + index.backend.save(index.store, tmp)
        if index.graph is not None:
            names += index.graph.save(tmp)
        files = {}
        for name in names:
            _fsync_file(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generation": gen,
            "generation_number": number,
            "type": index.kind,
            "params": index.params,
            "dim": index.dim,
            "count": len(index.store),
            "settings": index.settings,
            "files": files,
            "created": index.created,
            "saved": time.time(),
            "cbir_version": _version(),
        }
        if index.graph is not None:
            manifest["graph"] = {"k": index.graph.k, "exact": bool(index.graph.exact)}
        IndexManifest.parse(manifest, f"index manifest {root / MANIFEST}")  # never write what would not load
        fsync_dir(tmp)
        os.replace(tmp, root / gen)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # a folder this failed save made (left when anything else is in it)
        raise
    atomic_write_json(root / MANIFEST, manifest)
    for old in root.iterdir():  # best effort: older generations, abandoned temporary folders/files
        if old.is_dir() and old.name != gen and _GEN_DIR.match(old.name):
            shutil.rmtree(old, ignore_errors=True)
        elif old.is_file() and _TMP_MANIFEST.match(old.name):  # a killed manifest switch
            old.unlink(missing_ok=True)
    return root, number


def load_index(cls: type["Index"], root: Path, *, device: str = "auto", verify: bool = True, mmap: bool = False,
               digest: Callable[[Path], str | None] | None = None) -> "Index":
    """Open the current generation of ``root`` as an instance of ``cls``. ``mmap``: the vectors are
    memory-mapped (read-only; changes make copies). ``digest(file)``: the sha256 used to verify
    each file (default: hashed now; a memo such as :class:`cbir.cache.digest.DigestMemo` hashes each
    version of a generation file once)."""
    for attempt in range(3):  # a concurrent save may delete the generation we just read of
        manifest = read_manifest(root)
        try:
            return _load_generation(cls, root, manifest, device, verify, mmap, digest)
        except FileNotFoundError as exc:
            if attempt == 2 or read_manifest(root).get("generation") == manifest.get("generation"):
                raise FormatError(f"{root} is incomplete: {exc}") from exc
    raise AssertionError("unreachable")


def _load_generation(cls: type["Index"], root: Path, manifest: dict, device: str, verify: bool, mmap: bool = False,
                     digest: Callable[[Path], str | None] | None = None) -> "Index":
    """The generation named by ``manifest`` (already checked against :class:`IndexManifest`)."""
    where = root / MANIFEST
    gen = root / str(manifest["generation"])
    kind, dim, files = manifest["type"], int(manifest["dim"]), dict(manifest["files"])
    params, settings, count = dict(manifest["params"]), dict(manifest["settings"]), int(manifest["count"])
    graph_info = manifest.get("graph")
    for name in (VECTORS, IDS, SQLITE):
        if name not in files:
            raise FormatError(f"{where} lists no {name}")
    for name, desc in files.items():
        file = gen / name
        if not file.is_file():
            raise FileNotFoundError(f"index file missing: {file}")
        if file.stat().st_size != desc.get("bytes"):
            raise FormatError(f"{file} has {file.stat().st_size} bytes, the manifest says {desc.get('bytes')}: damaged or truncated")
        if verify and (digest or sha256_file)(file) != desc.get("sha256"):
            raise FormatError(f"{file} does not match its checksum in the manifest: the index is damaged")
    try:
        vectors = np.load(gen / VECTORS, allow_pickle=False, mmap_mode="r" if mmap else None)
        ids = np.load(gen / IDS, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise FormatError(f"{gen}: damaged array: {exc}") from exc
    if vectors.shape != (count, dim) or ids.shape != (count,) or ids.dtype != np.int64:
        raise FormatError(f"{gen}: vectors {vectors.shape} / ids {ids.shape} do not match the manifest ({count} x {dim})")
    if vectors.dtype != np.float32:
        raise FormatError(f"{gen / VECTORS}: the index stores float32 vectors, this array is {vectors.dtype.name}")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        shown = ", ".join(str(int(i)) for i in ids[bad[:5]]) + (", ..." if bad.size > 5 else "")
        raise FormatError(f"{gen / VECTORS}: {bad.size} vector(s) with NaN or infinite values (image ids {shown}): "
                          "the index is damaged; rebuild it (cbir index build)")
    try:
        params = check_params(kind, params, dim)
    except ValueError as exc:
        raise FormatError(f"{where}: params: {exc}") from exc
    index = cls(dim, kind, params, settings, device)
    index.created = float(manifest.get("created") or time.time())
    try:
        index.store = VectorStore(dim, ids, vectors)
    except ValueError as exc:
        raise FormatError(f"{gen}: {exc}") from exc
    index.meta = MetadataDB.load(gen / SQLITE)
    if not np.array_equal(np.sort(ids), index.meta.all_ids()):
        raise FormatError(f"{gen}: the metadata database and the vectors list different image ids")
    index.backend.load(index.store, gen)
    if graph_info:
        index.graph = KnnGraph.load(gen, count, exact=bool(graph_info.get("exact", True)), store_ids=ids)
    index.path, index.generation = root, int(manifest.get("generation_number", 0))
    return index


def next_free_id(path: str | os.PathLike[str]) -> int:
    """The first id an index at ``path`` has never given (0 when there is no index there).

    Reads the manifest and the current generation's metadata only; a rebuild that replaces the
    index starts its ids here, so an id never names two different images of one index folder.
    """
    root = Path(path)
    manifest = _read_manifest_or_none(root)
    if manifest is None:
        return 0
    try:
        sqlite_file = root / str(manifest["generation"]) / SQLITE
    except KeyError as exc:
        raise FormatError(f"{root / MANIFEST} names no generation") from exc
    return MetadataDB.load(sqlite_file).peek_next_id()


def latest_generation(path: str | os.PathLike[str]) -> int:
    """The generation number named by ``path``/manifest.json (reads that file only).

    FileNotFoundError when there is no index at ``path``; FormatError when it is not one.
    """
    manifest = read_manifest(Path(path))
    try:
        return int(manifest.get("generation_number", 0))
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{Path(path) / MANIFEST}: bad generation_number") from exc


def _read_manifest_or_none(root: Path) -> dict | None:
    try:
        return read_manifest(root)
    except (FileNotFoundError, FormatError):
        return None


def read_manifest(root: Path) -> dict:
    """The manifest of the index folder ``root`` (a dict) checked against :class:`IndexManifest`;
    FileNotFoundError / FormatError (:class:`cbir.schema.SchemaError` naming the field)."""
    if not root.exists():
        raise FileNotFoundError(f"index not found: {root}")
    if not root.is_dir():
        raise FormatError(f"{root} is not an index folder (expected a folder with {MANIFEST})")
    manifest = read_json(root / MANIFEST, what="index manifest")
    if not isinstance(manifest, dict):
        raise FormatError(f"{root / MANIFEST} is not an index manifest")
    check_format(manifest, FORMAT, (FORMAT_VERSION,), root / MANIFEST)
    IndexManifest.parse(manifest, f"index manifest {root / MANIFEST}")
    return manifest
