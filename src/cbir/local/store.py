"""``LocalFeatureStore``: the local features of a collection in one folder, and the driver that fills it.

Layout (format stamp ``local-features`` v1)::

    STORE/manifest.json                 settings, the list of complete shards (written last)
    STORE/shards/<name>.json            keys, feature count, image size and scale of each image, failures
    STORE/shards/<name>.keypoints.npy   (F, 4) float32: every image's keypoints, one after another
    STORE/shards/<name>.descriptors.npy (F, 128) uint8: their descriptors

A shard holds many images (``shard_size`` in :func:`extract_to_store`); image ``i`` of a shard owns
rows ``offsets[i]:offsets[i + 1]`` (offsets = cumulative ``counts``). Every file is written
atomically (:mod:`cbir.fileio`), the shard's ``.json`` after its arrays and ``manifest.json`` after
the shard, so a folder whose manifest is readable is complete: a crash leaves at most a shard the
manifest does not list, which is ignored and deleted by the next write. :func:`extract_to_store`
skips the keys already stored, so an interrupted extraction continues where it stopped and ends
with the same features as an uninterrupted run (SIFT is deterministic).

Reading runs no code (``np.load(allow_pickle=False)``, JSON) and memory-maps the arrays: ``get(key)``
reads that image's rows only (a few recently used shards stay open). Dtypes, shapes, lengths and
finite keypoints are checked; a crafted or damaged file is refused with one line naming it
(:class:`cbir.fileio.FormatError`). One writer at a time; readers open the store again after a write.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..fileio import FormatError, atomic_save_npy, atomic_write_json, check_format, read_json
from .features import DESCRIPTOR_DIM, LocalFeatures, LocalFeatureSettings, check_features

__all__ = ["LocalFeatureStore", "extract_to_store", "FORMAT", "FORMAT_VERSION"]

FORMAT = "local-features"
FORMAT_VERSION = 1
SHARD_FORMAT = "local-feature-shard"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
#: Images per shard written by :func:`extract_to_store` (about 256 x 2048 x 144 B = 75 MB at most).
SHARD_SIZE = 256
#: Shards kept open (memory-mapped) at once.
OPEN_SHARDS = 32


@dataclass
class _Shard:
    """What a shard's ``.json`` says (the arrays are opened lazily)."""

    name: str
    keys: list[str]
    counts: np.ndarray  # (n,) int64
    sizes: list[tuple[int, int]]
    scales: list[float]
    failed: dict[str, str]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def features(self) -> int:
        return int(self.counts.sum())


class LocalFeatureStore:
    """The local features of a collection, keyed by a string per image (an image id or a digest).

    ``LocalFeatureStore(path, settings)`` creates the folder when it has no manifest (``settings``
    needed) or opens it (ValueError when ``settings`` are given and differ from the stored ones).
    ``add``, ``remove``; ``get(key)``, ``key in store``, ``keys()``, ``len(store)``, ``failed``.
    """

    def __init__(self, path: str | os.PathLike[str], settings: LocalFeatureSettings | None = None):
        self.path = Path(path)
        self._open: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            if settings is None:
                raise FileNotFoundError(f"local feature store not found: {self.path} (no {MANIFEST})")
            if self.path.exists() and not self.path.is_dir():
                raise FileExistsError(f"{self.path} is a file, not a local feature store folder")
            self.settings = settings
            self._shards: list[_Shard] = []
            self._next = 0
            (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            self._write_manifest()
        else:
            self._read_manifest(manifest)
            if settings is not None and settings != self.settings:
                raise ValueError(f"{self.path} holds features made with {self.settings.key()}, not {settings.key()} "
                                 "(use another folder, or the stored settings)")
        self._index()

    # -- reading ---------------------------------------------------------------------------------

    def _read_manifest(self, manifest: Path) -> None:
        doc = read_json(manifest, what="local feature store manifest")
        check_format(doc, FORMAT, (FORMAT_VERSION,), manifest, "cbir local feature store")
        try:
            self.settings = LocalFeatureSettings.model_validate(doc["settings"])
            entries = [str(e["name"]) for e in doc["shards"]]
            self._next = int(doc["next_shard"])
        except Exception as exc:  # missing keys, wrong types, pydantic errors: one line naming the file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FormatError(f"{manifest}: bad local feature store manifest ({first})") from exc
        self._shards = [self._read_shard_info(name) for name in entries]

    def _shard_path(self, name: str, part: str) -> Path:
        return self.path / SHARD_DIR / f"{name}.{part}"

    def _read_shard_info(self, name: str) -> _Shard:
        if not name.isalnum():
            raise FormatError(f"{self.path / MANIFEST}: bad shard name {name!r}")
        path = self._shard_path(name, "json")
        doc = read_json(path, what="local feature shard")
        check_format(doc, SHARD_FORMAT, (FORMAT_VERSION,), path, "cbir local feature shard")
        keys, counts, sizes, failed = doc.get("keys"), doc.get("counts"), doc.get("sizes"), doc.get("failed", {})
        scales = doc.get("scales")
        ok = (isinstance(keys, list) and isinstance(counts, list) and isinstance(sizes, list)
              and isinstance(scales, list) and isinstance(failed, dict)
              and len(keys) == len(counts) == len(sizes) == len(scales)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0
                      for v in scales)
              and all(isinstance(k, str) and k for k in keys)
              and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
              and all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)
                      for s in sizes)
              and all(isinstance(k, str) and isinstance(v, str) for k, v in failed.items()))
        if not ok:
            raise FormatError(f"{path}: not a valid local feature shard (keys, counts, sizes, scales must be "
                              "lists of equal length: non-empty strings, counts >= 0, [width, height] > 0, "
                              "scales > 0)")
        return _Shard(name=name, keys=list(keys), counts=np.asarray(counts, dtype=np.int64),
                      sizes=[(int(w), int(h)) for w, h in sizes], scales=[float(v) for v in scales],
                      failed=dict(failed))

    def _index(self) -> None:
        self._where: dict[str, tuple[int, int]] = {}
        self._failed: dict[str, str] = {}
        for si, shard in enumerate(self._shards):
            for i, key in enumerate(shard.keys):
                if key in self._where:
                    raise FormatError(f"{self._shard_path(shard.name, 'json')}: key {key!r} is stored twice")
                self._where[key] = (si, i)
            self._failed.update(shard.failed)
        for key in self._where:
            self._failed.pop(key, None)

    def _arrays(self, shard: _Shard) -> tuple[np.ndarray, np.ndarray]:
        """(keypoints, descriptors) of a shard, memory-mapped and checked (dtype, shape, row count)."""
        if shard.name in self._open:
            self._open.move_to_end(shard.name)
            return self._open[shard.name]
        arrays = []
        for part, dtype, width in (("keypoints", np.float32, 4), ("descriptors", np.uint8, DESCRIPTOR_DIM)):
            path = self._shard_path(shard.name, f"{part}.npy")
            if not path.is_file():
                raise FileNotFoundError(f"local feature shard file not found: {path}")
            try:
                arr = np.load(path, mmap_mode="r" if shard.features else None, allow_pickle=False)
            except Exception as exc:  # object arrays (pickles), damaged headers
                raise FormatError(f"{path} is not a readable local feature array: {exc}") from exc
            if arr.dtype != dtype or arr.ndim != 2 or arr.shape != (shard.features, width):
                raise FormatError(f"{path}: expected a ({shard.features}, {width}) {np.dtype(dtype).name} array, "
                                  f"got {arr.dtype} {arr.shape}")
            arrays.append(arr)
        pair = (arrays[0], arrays[1])
        self._open[shard.name] = pair
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return pair

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        """Stored keys, in the order they were added."""
        return [k for shard in self._shards for k in shard.keys]

    @property
    def failed(self) -> dict[str, str]:
        """key -> reason, for images that could not be read (not retried by :func:`extract_to_store`)."""
        return dict(self._failed)

    def count(self, key: str) -> int:
        """Number of features of ``key`` (from the shard's list: no array is read)."""
        si, i = self._locate(key)
        return int(self._shards[si].counts[i])

    def _locate(self, key: str) -> tuple[int, int]:
        try:
            return self._where[key]
        except KeyError:
            raise KeyError(f"no local features for {key!r} in {self.path}") from None

    def get(self, key: str) -> LocalFeatures:
        """The features of ``key`` (KeyError when absent); only its rows are read from disk."""
        si, i = self._locate(key)
        shard = self._shards[si]
        kp, desc = self._arrays(shard)
        lo, hi = shard.offsets[i], shard.offsets[i + 1]
        keypoints = np.array(kp[lo:hi], dtype=np.float32)
        descriptors = np.array(desc[lo:hi], dtype=np.uint8)
        try:
            return LocalFeatures(keypoints, descriptors, shard.sizes[i], shard.scales[i])
        except ValueError as exc:
            raise FormatError(f"{self._shard_path(shard.name, 'keypoints.npy')}: features of {key!r} are invalid "
                              f"({str(exc).split(': ', 1)[-1]})") from exc

    def get_many(self, keys: Sequence[str]) -> list[LocalFeatures]:
        return [self.get(k) for k in keys]

    def validate(self) -> int:
        """Read every shard fully and check it (as :meth:`get` does); the number of images checked."""
        n = 0
        for shard in self._shards:
            kp, _ = self._arrays(shard)
            if not np.isfinite(np.asarray(kp)).all():
                raise FormatError(f"{self._shard_path(shard.name, 'keypoints.npy')}: keypoints hold NaN or "
                                  "infinite values")
            n += len(shard.keys)
        return n

    # -- writing ---------------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "settings": self.settings.model_dump(),
            "settings_key": self.settings.key(), "pycolmap": _pycolmap_version(),
            "images": int(sum(len(s.keys) for s in self._shards)),
            "features": int(sum(s.features for s in self._shards)),
            "shards": [{"name": s.name, "images": len(s.keys), "features": s.features} for s in self._shards],
            "next_shard": int(self._next)})

    def _write_shard(self, keys: list[str], feats: list[LocalFeatures], failed: Mapping[str, str]) -> _Shard:
        name = f"{self._next:08d}"
        self._next += 1
        kp = np.concatenate([f.keypoints for f in feats]) if feats else np.zeros((0, 4), np.float32)
        desc = np.concatenate([f.descriptors for f in feats]) if feats else np.zeros((0, DESCRIPTOR_DIM), np.uint8)
        atomic_save_npy(self._shard_path(name, "keypoints.npy"), kp.astype(np.float32, copy=False))
        atomic_save_npy(self._shard_path(name, "descriptors.npy"), desc.astype(np.uint8, copy=False))
        shard = _Shard(name=name, keys=list(keys), counts=np.asarray([len(f) for f in feats], dtype=np.int64),
                       sizes=[(int(f.size[0]), int(f.size[1])) for f in feats],
                       scales=[float(f.scale) for f in feats], failed=dict(failed))
        atomic_write_json(self._shard_path(name, "json"), {
            "format": SHARD_FORMAT, "format_version": FORMAT_VERSION, "keys": shard.keys,
            "counts": [int(c) for c in shard.counts], "sizes": [list(s) for s in shard.sizes],
            "scales": shard.scales, "failed": shard.failed})
        return shard

    def _commit(self, shards: list[_Shard]) -> None:
        """Make ``shards`` the store's content: manifest written, then files no shard lists deleted."""
        self._shards = shards
        self._write_manifest()
        self._open.clear()
        self._index()
        self._delete_orphans()

    def _delete_orphans(self) -> None:
        keep = {s.name for s in self._shards}
        for p in (self.path / SHARD_DIR).iterdir():
            stem = p.name.split(".", 1)[0]
            if stem not in keep and (stem.isdigit() or p.name.startswith(".")):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def add(self, items: Mapping[str, LocalFeatures] | Iterable[tuple[str, LocalFeatures]],
            failed: Mapping[str, str] | None = None, *, replace: bool = False) -> int:
        """Store ``items`` (key -> features) as one new shard, with ``failed`` (key -> reason) noted.

        A key already stored raises KeyError unless ``replace`` (its old features are dropped in the
        same commit); an earlier failure note of a key is dropped. Returns the number of images added. Settings are the store's: the caller
        extracts with ``store.settings``.
        """
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        failed = dict(failed or {})
        keys = [k for k, _ in pairs]
        for k, f in pairs:
            if not isinstance(k, str) or not k:
                raise ValueError(f"local feature keys must be non-empty strings, got {k!r}")
            if not isinstance(f, LocalFeatures):
                raise TypeError(f"features of {k!r} must be LocalFeatures, got {type(f).__name__}")
        if len(set(keys) | set(failed)) != len(keys) + len(failed):
            raise ValueError("a key is given twice (or both as features and as failed)")
        present = [k for k in list(keys) + list(failed) if k in self._where]
        if present and not replace:
            raise KeyError(f"{present[0]!r} is already in {self.path} (replace=True to overwrite)")
        if not pairs and not failed:
            return 0
        drop = set(present) | {k for k in list(keys) + list(failed) if k in self._failed}  # old failure notes go
        shards = self._without(drop) if drop else list(self._shards)
        shards.append(self._write_shard(keys, [f for _, f in pairs], failed))
        self._commit(shards)
        return len(pairs)

    def _without(self, drop: set[str]) -> list[_Shard]:
        """The shard list with ``drop`` taken out (affected shards rewritten under new names)."""
        out = []
        for shard in self._shards:
            hit = drop.intersection(shard.keys) or drop.intersection(shard.failed)
            if not hit:
                out.append(shard)
                continue
            keep = [k for k in shard.keys if k not in drop]
            feats = [self.get(k) for k in keep]
            failed = {k: v for k, v in shard.failed.items() if k not in drop}
            if keep or failed:
                out.append(self._write_shard(keep, feats, failed))
        return out

    def remove(self, keys: Iterable[str]) -> int:
        """Drop the features (and failure notes) of ``keys``; unknown keys are ignored. Returns how
        many stored images were removed."""
        drop = {k for k in keys if k in self._where or k in self._failed}
        if not drop:
            return 0
        n = sum(1 for k in drop if k in self._where)
        self._commit(self._without(drop))
        return n

    def __repr__(self) -> str:
        return f"LocalFeatureStore({str(self.path)!r}, {len(self)} images, {self.settings.key()})"


def _pycolmap_version() -> str | None:
    try:
        import pycolmap
    except ImportError:  # pragma: no cover - pycolmap is a dependency
        return None
    return str(getattr(pycolmap, "__version__", None))


# ---------------------------------------------------------------------------------------------
# The driver


def _extract_one(args: tuple[str, Any, Any, LocalFeatureSettings, str]) -> tuple[str, LocalFeatures | None, str | None]:
    """(key, features, None) or (key, None, reason) for one image (a worker's unit of work)."""
    from ..extraction.images import ImageError
    from .features import extract_local

    key, path, bbox, settings, device = args
    try:
        return key, extract_local(path, settings, bbox, device=device), None
    except ImageError as exc:
        return key, None, exc.reason


def extract_to_store(
    paths: Sequence[str | os.PathLike[str]],
    keys: Sequence[str],
    settings: LocalFeatureSettings | None,
    store: LocalFeatureStore | str | os.PathLike[str],
    *,
    bboxes: Sequence[Any] | None = None,
    progress: Callable[[int], Any] | None = None,
    workers: int = 1,
    shard_size: int = SHARD_SIZE,
    device: str = "auto",
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Extract the local features of ``paths`` into ``store`` under ``keys``, skipping keys already
    stored (and, unless ``retry_failed``, those noted as failed): resumable.

    ``store``: a store or a folder (created with ``settings``; ``settings`` None = the store's).
    Every ``shard_size`` images one shard is written (the resume points). ``workers`` > 1 extracts
    in that many processes (pycolmap holds the GIL: threads would not run in parallel); the
    result does not depend on it. ``progress(n)`` is called with the number of images just done
    (e.g. ``tqdm.update``). Unreadable images are noted in ``store.failed`` (one line each), not raised.
    Returns ``{"extracted", "skipped", "failed" (key -> reason, this run), "store"}``.
    """
    if len(paths) != len(keys):
        raise ValueError(f"{len(paths)} paths for {len(keys)} keys")
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ValueError(f"key {dup!r} is given twice")
    if bboxes is not None and len(bboxes) != len(paths):
        raise ValueError(f"{len(bboxes)} crop boxes for {len(paths)} paths")
    if shard_size < 1 or workers < 1:
        raise ValueError("shard_size and workers must be >= 1")
    if not isinstance(store, LocalFeatureStore):
        store = LocalFeatureStore(store, settings)
    elif settings is not None and settings != store.settings:
        raise ValueError(f"{store.path} holds features made with {store.settings.key()}, not {settings.key()}")
    settings = store.settings
    from .features import pycolmap_device

    pycolmap_device(device)  # a bad device fails before any work
    failed_before = store.failed
    todo = [i for i, k in enumerate(keys) if k not in store and (retry_failed or k not in failed_before)]
    skipped = len(keys) - len(todo)
    if progress is not None and skipped:
        progress(skipped)
    jobs = [(keys[i], str(paths[i]), None if bboxes is None else bboxes[i], settings, device) for i in todo]
    failed_now: dict[str, str] = {}
    extracted = 0
    pool = None
    try:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        for start in range(0, len(jobs), shard_size):
            chunk = jobs[start:start + shard_size]
            results = pool.map(_extract_one, chunk, chunksize=4) if pool is not None else map(_extract_one, chunk)
            feats: list[tuple[str, LocalFeatures]] = []
            bad: dict[str, str] = {}
            for key, f, reason in results:
                if f is None:
                    bad[key] = str(reason)
                else:
                    feats.append((key, f))
                if progress is not None:
                    progress(1)
            store.add(feats, bad)
            extracted += len(feats)
            failed_now.update(bad)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return {"extracted": extracted, "skipped": skipped, "failed": failed_now, "store": store}
