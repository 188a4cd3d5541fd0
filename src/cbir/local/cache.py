"""The local-feature cache: every image's SIFT features extracted once per settings, shared by every run.

Layout, beside the descriptor stores of :mod:`cbir.cache` (the same cache folder, ``$CBIR_CACHE``)::

    CACHE/local-v1/<settings key>/     a LocalFeatureStore (cbir.local.store) made with those settings
    CACHE/local-v1/<settings key>.lock the writers' lock (an OS file lock: released when its process dies)

An image is named by its content, as the descriptor cache names it
(:func:`cbir.cache.describe.item_keys`): the SHA-256 of the file's bytes (memoised per file
version in ``CACHE/digests.sqlite``), and for a crop the clipped whole-pixel box:
``<sha256>`` or ``<sha256>@x1,y1,x2,y2``. A box covering the whole image is no box, so a
whole-image query that is also a database photo (Holidays) is extracted once and has the same
features as that photo. The settings key (:meth:`cbir.local.features.LocalFeatureSettings.key`)
names everything that decides the features, so other settings never read these.

Writers take the lock and open the store again under it (another process may have added shards
meanwhile), then extract what is missing (:func:`cbir.local.store.extract_to_store`: resumable,
atomic shards); a run that finds every key already stored reads without locking. Readers of a
store that a writer changes later keep their (immutable) shards; they open the store again to see
the new ones. ``cbir cache info`` lists these stores and ``cbir cache clear`` deletes them
(:func:`local_cache_info`, :func:`clear_local_cache`); ``prune`` bounds the descriptor stores only.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .features import LocalFeatureSettings
from .store import MANIFEST, LocalFeatureStore, extract_to_store

__all__ = ["CACHE_VERSION", "cache_folder", "store_path", "writing", "item_key", "CachedFeatures", "extract_cached",
           "local_cache_info", "clear_local_cache"]

CACHE_VERSION = 1


def cache_folder(root: str | os.PathLike[str]) -> Path:
    """Where the local-feature stores of cache ``root`` live (the layout version is in the name)."""
    return Path(root).expanduser() / f"local-v{CACHE_VERSION}"


def store_path(root: str | os.PathLike[str], settings: LocalFeatureSettings) -> Path:
    """The store of ``settings`` in cache ``root``."""
    return cache_folder(root) / settings.key()


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], settings: LocalFeatureSettings | None = None, *,
            lock: str | os.PathLike[str] | None = None, timeout: float = -1) -> Iterator[LocalFeatureStore]:
    """The store at ``path`` (created with ``settings`` if absent) opened under its writer lock
    (``<path>.lock``, or ``lock``), for changes; the lock is released on exit. ``timeout``
    seconds (negative: wait as long as it takes; a killed writer's lock is freed by the OS)."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock if lock is not None else path.with_name(path.name + ".lock")), timeout=timeout):
        yield LocalFeatureStore(path, settings)


def item_key(digest: str, box: str) -> str:
    """The store key of an image: ``digest``, or ``digest@x1,y1,x2,y2`` for a crop (``box`` as
    :func:`cbir.cache.describe.box_key` writes it, "" for none)."""
    return digest if not box else f"{digest}@{box}"


@dataclass
class CachedFeatures:
    """What :func:`extract_cached` did: the store, each input's key (None: unreadable), counts."""

    store: LocalFeatureStore
    keys: list[str | None]
    extracted: int = 0
    from_cache: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def get(self, i: int):
        """The features of input ``i`` (None when it could not be read)."""
        key = self.keys[i]
        return None if key is None or key not in self.store else self.store.get(key)

    def line(self) -> str:
        fail = f", {len(self.failed)} unreadable" if self.failed else ""
        return (f"local features ({self.store.settings.key()}): {self.extracted} images extracted, "
                f"{self.from_cache} from the cache{fail}")


def _box_tuple(box: str) -> tuple[int, int, int, int] | None:
    if not box:
        return None
    x1, y1, x2, y2 = (int(v) for v in box.split(","))
    return x1, y1, x2, y2


def extract_cached(
    paths: Sequence[str | os.PathLike[str]],
    bboxes: Sequence[Any] | None = None,
    *,
    settings: LocalFeatureSettings | None = None,
    root: str | os.PathLike[str] | None = None,
    progress: bool = False,
    workers: int = 1,
    device: str = "auto",
    desc: str = "local features",
) -> CachedFeatures:
    """The local features of ``paths`` (cropped to ``bboxes``) through the cache ``root`` (default:
    :func:`cbir.cache.digest.default_cache_dir`): keys by content (module doc), each image
    extracted at most once, none when the cache holds it. ``progress``: a tqdm bar on stderr.
    An unreadable image gets key None (or its failure is noted in the store) and no features."""
    from ..cache.describe import item_keys
    from ..cache.digest import DigestMemo, default_cache_dir

    settings = settings or LocalFeatureSettings()
    root = Path(default_cache_dir() if root is None else root).expanduser()
    boxes = list(bboxes) if bboxes is not None else [None] * len(paths)
    if len(boxes) != len(paths):
        raise ValueError(f"{len(boxes)} crop boxes for {len(paths)} images")
    pairs = item_keys([Path(p) for p in paths], boxes, DigestMemo(root))
    keys = [None if k is None else item_key(*k) for k in pairs]
    path = store_path(root, settings)
    todo: dict[str, tuple[Path, Any]] = {}
    for p, k, pair in zip(paths, keys, pairs):
        if k is not None and k not in todo:
            todo[k] = (Path(p), _box_tuple(pair[1]))
    store = LocalFeatureStore(path, settings) if (path / MANIFEST).is_file() else None
    if store is not None and all(k in store or k in store.failed for k in todo):
        return CachedFeatures(store, keys, 0, len(todo), {k: store.failed[k] for k in todo if k in store.failed})
    t0 = time.perf_counter()
    with writing(path, settings) as store:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), unit="img", desc=desc, dynamic_ncols=True)
        try:
            res = extract_to_store([p for p, _ in todo.values()], list(todo), None, store,
                                   bboxes=[b for _, b in todo.values()], progress=bar.update if bar else None,
                                   workers=workers, device=device)
        finally:
            if bar is not None:
                bar.close()
    failed = {k: store.failed[k] for k in todo if k in store.failed}
    return CachedFeatures(store, keys, int(res["extracted"]), int(res["skipped"]), failed,
                          time.perf_counter() - t0)


def local_cache_info(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One dict per local-feature store of cache ``root``: path, settings key, images, bytes on disk."""
    out = []
    folder = cache_folder(root)
    if not folder.is_dir():
        return out
    for path in sorted(p for p in folder.iterdir() if p.is_dir()):
        rec: dict[str, Any] = {"path": str(path), "key": path.name,
                               "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}
        try:
            rec["images"] = len(LocalFeatureStore(path))
        except (OSError, ValueError):  # damaged or half-made: counted as unreadable
            rec["images"] = None
        out.append(rec)
    return out


def clear_local_cache(root: str | os.PathLike[str]) -> int:
    """Delete every local-feature store of cache ``root`` (each under its writer lock); returns the
    number of images whose features were removed."""
    import shutil

    from filelock import FileLock

    removed = 0
    for rec in local_cache_info(root):
        path = Path(rec["path"])
        with FileLock(str(path.with_name(path.name + ".lock"))):
            removed += rec["images"] or 0
            shutil.rmtree(path, ignore_errors=True)
    return removed
