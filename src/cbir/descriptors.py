"""``Descriptors``: the one currency between stages, in memory or as a sharded store on disk.

Two layouts of a descriptor folder, both read by :meth:`Descriptors.load`:

- single file (format_version 1): ``descriptors.npy`` (N x D, row i for image ``ids[i]``) and
  ``meta.json`` (``ids``, ``failed``, the settings that made the vectors, a format stamp).
- shards (format_version 2, what ``cbir extract`` writes): ``shards/<start>.npy`` (rows x D,
  float32 or float16) + ``shards/<start>.json`` (``ids`` of those rows, ``failed``, the input range
  [start, stop)), one pair per ``shard_size`` consecutive inputs (fewer rows where images failed),
  written as extraction goes (they are its resume points), and ``meta.json`` listing the shards.
  Loading memory-maps the shards: ``.vectors`` is a :class:`ShardedArray` that indexes like an
  (N, D) array without reading the rows; :meth:`Descriptors.iter_chunks` walks them in bounded memory.

Every file is written atomically; ``meta.json`` last, so a folder with a readable ``meta.json``
whose row counts match the arrays is complete. ``save(out)`` / ``save(out, shard_size=K)`` convert
between the layouts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from pydantic import ConfigDict, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .fileio import FormatError, atomic_save_npy, atomic_write_json, check_format, read_json
from .linalg import l2_normalize  # noqa: F401  (re-exported; the function lives in cbir.linalg)
from .schema import MAX_DIM, MAX_ROWS, FileName, Float, Int, JsonObject, Schema, Str, field_name, plain_json

FORMAT = "descriptors"
FORMAT_VERSION = 1
SHARDED_VERSION = 2
ARRAY_NAME = "descriptors.npy"
META_NAME = "meta.json"
SHARD_DIR = "shards"

# Settings that must agree for two descriptor sets to be comparable.
COMPAT_KEYS = ("model", "pooling", "whitening", "dim")
#: The dtypes a descriptor array may have on disk.
DTYPES = ("float32", "float16")
#: Largest descriptor meta.json read (its ``paths`` name every image: about 60 bytes each).
MAX_META_BYTES = 1 << 30


# ---------------------------------------------------------------------------------------------
# Schemas of the files (cbir.schema): every violation is one line naming the file and the field


class ShardEntry(Schema):
    """One shard in a sharded ``meta.json``: its file stem ``name`` (a plain name in ``shards/``),
    its ``rows`` and the input range [start, stop) it covers."""

    name: FileName
    rows: Int(ge=0, le=MAX_ROWS)
    start: Int(ge=0, le=MAX_ROWS)
    stop: Int(ge=0, le=MAX_ROWS)

    @field_validator("stop")
    @classmethod
    def _range(cls, v: int, info: ValidationInfo) -> int:
        start, rows = info.data.get("start"), info.data.get("rows")
        if start is not None and (v < start or (rows is not None and rows > v - start)):
            raise PydanticCustomError("cbir", "must be >= start + rows (got start {start}, rows {rows}, stop {stop})",
                                      {"start": start, "rows": rows, "stop": v})
        return v


class ShardMeta(Schema):
    """``shards/<start>.json``: the ``ids`` of the shard's rows, the inputs that ``failed``, the range."""

    ids: list[Str]
    failed: list[JsonObject] = []
    start: Int(ge=0, le=MAX_ROWS)
    stop: Int(ge=0, le=MAX_ROWS)


class DescriptorMeta(Schema):
    """``meta.json`` of a descriptor folder, format ``descriptors`` v1 (single ``descriptors.npy``,
    ``ids`` listed here) or v2 (``layout: "shards"``, ``shards`` listed here, ids in each shard's
    .json). The structure is strict; the other keys are the settings that made the vectors
    (``model``, ``pooling``, ``imsize``, ``scales``, ``paths``, ... open: extraction records what
    it used) and must be plain JSON (finite numbers); the common ones are typed."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["descriptors"]
    format_version: Literal[1, 2]
    layout: Literal["shards"] | None = None
    ids: list[Str] | None = None
    shards: list[ShardEntry] | None = None
    rows: Int(ge=0, le=MAX_ROWS) | None = None
    failed: list[JsonObject] = []
    dim: Int(ge=0, le=MAX_DIM) | None = None
    dtype: Literal["float32", "float16"] | None = None
    # settings with a known type
    model: Str | None = None
    pooling: Str | None = None
    imsize: Int(ge=1, le=MAX_DIM) | None = None
    scales: list[Float(gt=0.0, le=16.0)] | None = None
    paths: dict[str, Str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if key not in cls.model_fields:
                    try:
                        plain_json(value)
                    except PydanticCustomError as exc:
                        raise PydanticCustomError("cbir", "{key}: {problem}",
                                                  {"key": field_name(key), "problem": exc.message()}) from None
        return data

    @model_validator(mode="before")
    @classmethod
    def _layout(cls, data: Any) -> Any:
        if isinstance(data, dict):
            key = {1: "ids", 2: "shards"}.get(data.get("format_version"))
            if key is not None and data.get(key) is None:
                what = "is missing" if key not in data else "must be a list (got null)"
                raise PydanticCustomError("cbir", "{key}: {what} (format_version {v} lists its {key} in meta.json)",
                                          {"key": key, "what": what, "v": data["format_version"]})
        return data




@dataclass
class Descriptors:
    """ids[i] names row i of ``vectors`` (N x D, float32 or float16)."""

    ids: list[str]
    vectors: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"descriptors must be a 2-D array (N x D), got shape {self.vectors.shape}")
        if len(self.ids) != self.vectors.shape[0]:
            raise ValueError(f"{len(self.ids)} ids for {self.vectors.shape[0]} descriptor rows")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("descriptor ids must be unique")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self, names: list[str]) -> np.ndarray:
        """Row index of each name; KeyError naming the first missing one."""
        lookup = {name: i for i, name in enumerate(self.ids)}
        rows = []
        for name in names:
            if name not in lookup:
                raise KeyError(f"image id {name!r} is not among the {len(self.ids)} descriptors")
            rows.append(lookup[name])
        return np.asarray(rows, dtype=np.int64)

    def iter_chunks(self, rows: int = 65536, dtype: Any = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, block) for consecutive row blocks ``vectors[start:start + rows]`` (the last one shorter).

        Reads at most ``rows`` rows at a time from a memory-mapped store (shard borders are crossed
        transparently), so a consumer such as a chunked top-k scores 1M descriptors in bounded memory.
        ``dtype`` converts each block (e.g. np.float32 for float16 shards). The pairs are what
        ``cbir.topk.chunked_topk(q, desc.iter_chunks(rows, np.float32), k)`` takes as its database.
        """
        if isinstance(self.vectors, ShardedArray):
            yield from self.vectors.iter_chunks(rows, dtype)
        else:
            yield from iter_row_chunks(self.vectors, rows, dtype)

    def save(self, out_dir: str | Path, shard_size: int | None = None) -> None:
        """Write the folder: a single ``descriptors.npy`` (default) or shards of ``shard_size`` rows.

        Files of the other layout left in ``out_dir`` by an earlier save are removed after the new
        ``meta.json`` is written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if shard_size is not None:
            self._save_shards(out, int(shard_size))
            return
        atomic_save_npy(out / ARRAY_NAME, np.asarray(self.vectors))
        meta = {k: v for k, v in self.meta.items() if k not in ("layout", "shards", "rows")}
        meta.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            ids=list(self.ids),
            failed=list(self.failed),
            dim=self.dim,
            dtype=str(self.vectors.dtype),
        )
        atomic_write_json(out / META_NAME, meta)
        shutil.rmtree(out / SHARD_DIR, ignore_errors=True)

    def _save_shards(self, out: Path, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        shard_dir = out / SHARD_DIR
        if (out / META_NAME).is_file():  # the folder stops being complete until the new meta.json
            (out / META_NAME).unlink()
        shutil.rmtree(shard_dir, ignore_errors=True)
        shards = []
        for start, block in self.iter_chunks(shard_size):
            ids = self.ids[start:start + len(block)]
            shards.append(write_shard(shard_dir, start, start + len(block), ids, block, []))
        write_sharded_meta(out, shards, self.meta, self.failed, self.dim, str(self.vectors.dtype))
        (out / ARRAY_NAME).unlink(missing_ok=True)

    @classmethod
    def load(cls, out_dir: str | Path, mmap: bool | None = None, check_finite: bool | None = None) -> "Descriptors":
        """Read a descriptor folder of either layout, checked: ``meta.json`` against
        :class:`DescriptorMeta` (shard .json files against :class:`ShardMeta`), each array's dtype
        (float32 or float16), its shape against its meta (rows = ids, width = ``dim``).

        ``mmap``: None (default) memory-maps a sharded store (``vectors`` a :class:`ShardedArray`) and
        reads a single file into memory; True memory-maps both; False reads both into memory (ndarray).
        ``check_finite``: refuse NaN / infinite rows naming their ids (FormatError); None (default)
        checks when the vectors are read into memory, and leaves a memory-mapped store to the
        consumer (:meth:`nonfinite_ids`; the chunked top-k refuses NaN scores) so that opening a 1M
        store stays free.
        """
        out = Path(out_dir)
        meta_path = out / META_NAME
        raw = read_json(meta_path, what="descriptor metadata", max_bytes=MAX_META_BYTES)
        check_format(raw, FORMAT, (FORMAT_VERSION, SHARDED_VERSION), meta_path)
        doc = DescriptorMeta.parse(raw, f"descriptor metadata {meta_path}")
        meta = dict(raw)
        if doc.format_version == SHARDED_VERSION:
            desc = cls._load_shards(out, meta, doc, mmap)
        else:
            array_path = out / ARRAY_NAME
            if not array_path.is_file():
                raise FileNotFoundError(f"descriptor array not found: {array_path}")
            vectors = load_array(array_path, mmap=bool(mmap), rows=len(doc.ids or []), dim=doc.dim, dtype=doc.dtype,
                                 what="meta.json")
            meta.pop("ids")
            meta.pop("failed", None)
            desc = cls(ids=list(doc.ids or []), vectors=vectors, meta=meta, failed=list(doc.failed))
        if check_finite or (check_finite is None and not isinstance(desc.vectors, (np.memmap, ShardedArray))):
            desc.check_finite(where=str(out))
        return desc

    @classmethod
    def _load_shards(cls, out: Path, meta: dict, doc: DescriptorMeta, mmap: bool | None) -> "Descriptors":
        shard_dir = out / SHARD_DIR
        ids: list[str] = []
        arrays = []
        for entry in doc.shards or []:
            info = ShardMeta.parse(read_json(shard_dir / f"{entry.name}.json", what="descriptor shard"),
                                   f"descriptor shard {shard_dir / (entry.name + '.json')}")
            path = shard_dir / f"{entry.name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"descriptor shard not found: {path}")
            if len(info.ids) != entry.rows:
                raise FormatError(f"{shard_dir / (entry.name + '.json')} lists {len(info.ids)} ids but "
                                  f"{out / META_NAME} says the shard has {entry.rows} rows")
            arr = load_array(path, mmap=True, rows=entry.rows, dim=doc.dim, dtype=doc.dtype, what="meta.json")
            ids.extend(info.ids)
            arrays.append(arr)
        if doc.rows is not None and doc.rows != len(ids):
            raise FormatError(f"{out / META_NAME}: rows is {doc.rows} but its shards hold {len(ids)}")
        for key in ("ids", "failed", "shards"):
            meta.pop(key, None)
        vectors = ShardedArray(arrays, dim=int(doc.dim or 0), dtype=doc.dtype or "float32")
        if mmap is False:
            vectors = np.asarray(vectors)
        return cls(ids=ids, vectors=vectors, meta=meta, failed=list(doc.failed))

    def nonfinite_ids(self, limit: int | None = None, rows: int = 65536) -> list[str]:
        """Ids of rows holding a NaN or an infinity (read in bounded blocks; at most ``limit``)."""
        bad: list[str] = []
        for start, block in self.iter_chunks(rows):
            for r in nonfinite_rows(block):
                bad.append(self.ids[start + int(r)])
                if limit is not None and len(bad) >= limit:
                    return bad
        return bad

    def check_finite(self, where: str = "descriptors") -> None:
        """FormatError naming the first ids of rows with a NaN or an infinity (none: returns)."""
        bad = self.nonfinite_ids(limit=6)
        if bad:
            shown = ", ".join(map(repr, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise FormatError(f"{where}: descriptors with NaN or infinite values (ids {shown}): damaged or "
                              "not made by cbir; extract those images again")


def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``block`` (m, D) holding a NaN or an infinity."""
    block = np.asarray(block)
    if not np.issubdtype(block.dtype, np.floating):
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(block).all(axis=1))


def load_array(path: Path, *, mmap: bool, rows: int | None = None, dim: int | None = None,
               dtype: str | None = None, what: str = "its meta") -> np.ndarray:
    """A descriptor array (.npy, no pickles), checked: readable (an empty or truncated file is a
    FormatError naming it, not EOFError), 2-D, float32 or float16, and ``rows`` x ``dim`` of
    ``dtype`` when given (what ``what`` says)."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        reason = "empty" if path.is_file() and path.stat().st_size == 0 else f"damaged ({exc})"
        raise FormatError(f"{path} is {reason}: not a descriptor array") from exc
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        raise FormatError(f"{path}: a descriptor array is 2-D (rows x dim), this one has shape {getattr(arr, 'shape', '?')}")
    if arr.dtype.name not in DTYPES:
        raise FormatError(f"{path}: descriptors are float32 or float16, this array is {arr.dtype.name}")
    if dtype is not None and arr.dtype.name != dtype:
        raise FormatError(f"{path} holds {arr.dtype.name} but {what} says {dtype}")
    if rows is not None and arr.shape[0] != rows:
        raise FormatError(f"{path} has {arr.shape[0]} rows but {what} lists {rows} ids")
    if dim is not None and arr.shape[0] and arr.shape[1] != dim:
        raise FormatError(f"{path} is {arr.shape[1]} wide but {what} says dim {dim}")
    return arr


class ShardedArray:
    """Read-only (N, D) view over row shards (memory-mapped .npy files) without concatenating them.

    Supports ``shape``, ``dtype``, ``ndim``, ``len``, ``a[i]``, ``a[start:stop]``, ``a[int_array]``,
    ``a[bool_mask]``, ``a[rows, cols]``, ``np.asarray(a)`` (reads everything), ``astype``,
    ``.T`` (reads everything) and :meth:`iter_chunks`. Indexing returns ordinary ndarrays.
    """

    def __init__(self, shards: Sequence[np.ndarray], dim: int = 0, dtype: Any = "float32"):
        self.shards = [s for s in shards if s.shape[0] > 0]
        dims = {int(s.shape[1]) for s in shards}
        if len(dims) > 1:
            raise FormatError(f"descriptor shards of different widths {sorted(dims)}")
        self.dim = dims.pop() if dims else int(dim)
        self.dtype = np.dtype(shards[0].dtype if shards else dtype)
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards]).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), self.dim

    ndim = 2

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return len(self) * self.dim * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        n = len(self)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} descriptors")
        rows = np.where(rows < 0, rows + n, rows)
        out = np.empty(rows.shape + (self.dim,), dtype=self.dtype)
        flat, dest = rows.ravel(), out.reshape(-1, self.dim)
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        for k in np.unique(which):
            sel = which == k
            dest[sel] = self.shards[k][flat[sel] - self.offsets[k]]
        return out

    def _slice(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, self.dim), dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        parts = []
        k = first
        while k < len(self.shards) and self.offsets[k] < stop:
            lo, hi = max(start, self.offsets[k]) - self.offsets[k], min(stop, self.offsets[k + 1]) - self.offsets[k]
            parts.append(self.shards[k][lo:hi])
            k += 1
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, key: Any) -> np.ndarray:
        cols = None
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError("a ShardedArray is 2-D")
            key, cols = key
        if isinstance(key, (int, np.integer)):
            out = self._rows(np.asarray([key]))[0]
        elif isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            out = self._slice(start, stop) if step == 1 else self._rows(np.arange(start, stop, step))
        else:
            arr = np.asarray(key)
            if arr.dtype == bool:
                if arr.shape != (len(self),):
                    raise IndexError(f"boolean mask of shape {arr.shape} for {len(self)} rows")
                arr = np.flatnonzero(arr)
            out = self._rows(arr)
        return out if cols is None else out[..., cols]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._slice(0, len(self)) if len(self) else np.empty((0, self.dim), self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    @property
    def T(self) -> np.ndarray:
        return np.asarray(self).T

    def iter_chunks(self, rows: int = 65536, dtype: Any = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, block) for ``self[start:start + rows]`` in order; see :meth:`Descriptors.iter_chunks`.

        The pages of every shard already read are handed back to the kernel (``madvise(MADV_DONTNEED)``;
        they stay in the page cache), so streaming a large store keeps the resident memory at a few blocks.
        """
        released = 0
        for start, block in iter_row_chunks(self, rows, dtype):
            yield start, block
            end = start + len(block)
            while released < len(self.shards) and self.offsets[released + 1] <= end:
                _release(self.shards[released])
                released += 1


def _release(arr: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped array (no-op for an in-memory one)."""
    import mmap

    m = getattr(arr, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def iter_row_chunks(vectors: Any, rows: int = 65536, dtype: Any = None) -> Iterator[tuple[int, np.ndarray]]:
    """(start, vectors[start:start + rows]) over an (N, D) ndarray, memmap or :class:`ShardedArray`."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    n = len(vectors)
    for start in range(0, n, rows):
        block = np.asarray(vectors[start:min(start + rows, n)])
        yield start, block if dtype is None else block.astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Shards, written one by one by extraction (cbir.extraction.job) and by Descriptors.save


def shard_name(start: int) -> str:
    """File stem of the shard holding inputs from ``start`` on (zero-padded so names sort by row)."""
    return f"{int(start):012d}"


def write_shard(shard_dir: str | Path, start: int, stop: int, ids: Sequence[str], vectors: np.ndarray,
                failed: list[dict[str, str]]) -> dict[str, Any]:
    """Atomically write one shard (.npy rows, then .json ids/failed: the .json marks it complete).

    Returns its entry for ``meta.json``: {"name", "rows", "start", "stop"}.
    """
    shard_dir = Path(shard_dir)
    name = shard_name(start)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"shard {name}: {len(ids)} ids for an array of shape {vectors.shape}")
    atomic_save_npy(shard_dir / f"{name}.npy", vectors)
    atomic_write_json(shard_dir / f"{name}.json", {"ids": list(ids), "failed": list(failed),
                                                   "start": int(start), "stop": int(stop)})
    return {"name": name, "rows": int(vectors.shape[0]), "start": int(start), "stop": int(stop)}


def read_shard(shard_dir: str | Path, start: int) -> tuple[dict[str, Any], np.ndarray] | None:
    """(info, memory-mapped rows) of a complete shard, or None when it is missing or damaged
    (its .json against :class:`ShardMeta`, its .npy as :func:`load_array`)."""
    shard_dir = Path(shard_dir)
    name = shard_name(start)
    try:
        info = ShardMeta.parse(read_json(shard_dir / f"{name}.json", what="descriptor shard"), name).model_dump()
        arr = load_array(shard_dir / f"{name}.npy", mmap=True, rows=len(info["ids"]))
    except (FileNotFoundError, FormatError, ValueError, OSError):
        return None
    info["name"] = name
    return info, arr


def write_sharded_meta(out: str | Path, shards: list[dict[str, Any]], meta: dict[str, Any],
                       failed: list[dict[str, str]], dim: int, dtype: str) -> None:
    """Write ``meta.json`` of a sharded folder (last: it makes the folder complete)."""
    meta = dict(meta)
    meta.pop("ids", None)
    meta.update(format=FORMAT, format_version=SHARDED_VERSION, layout="shards", shards=list(shards),
                rows=int(sum(s["rows"] for s in shards)), failed=list(failed), dim=int(dim), dtype=str(dtype))
    atomic_write_json(Path(out) / META_NAME, meta)


def read_fvecs(path: str | Path) -> np.ndarray:
    """Read the .fvecs layout (each row: int32 dimension d, then d float32) into an (N, d) array."""
    raw = np.fromfile(path, dtype=np.int32)
    if raw.size == 0:
        raise FormatError(f"{path} is empty")
    d = int(raw[0])
    if d <= 0 or raw.size % (d + 1):
        raise FormatError(f"{path} is not a valid .fvecs file (dimension {d}, {raw.size} words)")
    rows = raw.reshape(-1, d + 1)
    if not np.all(rows[:, 0] == d):
        raise FormatError(f"{path}: rows of differing dimension")
    return rows[:, 1:].copy().view(np.float32)
