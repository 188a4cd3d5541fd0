"""An index's local features and its spatial-verification setting (``cbir index build --verify K``).

On disk, beside the generations of :mod:`cbir.index.persist`::

    INDEX/local/          a LocalFeatureStore (cbir.local.store): the SIFT features of every indexed
                          image, keyed by its index id (the decimal string: "17")
    INDEX/local.lock      the store's writer lock (an OS file lock, freed when its process dies)
    INDEX/verify.json     format "cbir-index-verify" v1: {"verify": VerifyParams}, the verification
                          `cbir search` and `cbir serve` apply by default

Keyed by id, not by content: ids are never reused in an index (:mod:`cbir.index.writer`), so a
key can only ever name one image; an image re-described in place (``index add --update``) has its
features extracted again (``refresh``). The store follows the index (:func:`sync_local`, run by
``index build/add/remove`` and by the service after each change, under the store's lock): ids
without features are extracted, features of ids no longer indexed are removed. It is not part of
a generation (copying every image's features at each save would cost far more than the
descriptors), so a crash between the index's save and the store's update leaves the store behind
(new images not yet verifiable: 0 inliers; removed ones never asked for) until the next sync puts
it right. Readers (:class:`LocalFeatures`) open the store again whenever its manifest changes.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from ..fileio import atomic_write_json
from ..rerank.verify import VerifyParams
from ..schema import Schema, load_schema

__all__ = ["LOCAL_DIR", "LOCK_NAME", "VERIFY_FILE", "IndexVerify", "load_verify", "save_verify", "has_local",
           "drop_local", "sync_local", "add_local", "remove_local", "LocalFeatures", "index_verifier", "NO_LOCAL"]

LOCAL_DIR = "local"
LOCK_NAME = "local.lock"
VERIFY_FILE = "verify.json"
VERIFY_FORMAT = "cbir-index-verify"
VERIFY_VERSION = 1


class IndexVerify(Schema):
    """``INDEX/verify.json``: the spatial verification searches of this index apply by default."""

    format: Literal["cbir-index-verify"]
    format_version: Literal[1]
    verify: VerifyParams


def NO_LOCAL(index_path: str | os.PathLike[str], k: int | None = None) -> str:
    """The one line that says an index has no local features, and how to add them."""
    k = k or VerifyParams().k
    return (f"the index {index_path} has no local features for --verify: add them with "
            f"`cbir index add {index_path} --verify {k}` (or build it with --verify {k})")


def load_verify(index_path: str | os.PathLike[str]) -> VerifyParams | None:
    """The verification kept with the index (``INDEX/verify.json``), or None."""
    path = Path(index_path) / VERIFY_FILE
    if not path.is_file():
        return None
    return load_schema(path, IndexVerify, "index verification setting", VERIFY_FORMAT, (VERIFY_VERSION,)).verify


def save_verify(index_path: str | os.PathLike[str], verify: VerifyParams | None) -> None:
    """Keep ``verify`` with the index (None: remove the setting; the features stay)."""
    path = Path(index_path) / VERIFY_FILE
    if verify is None:
        path.unlink(missing_ok=True)
        return
    atomic_write_json(path, {"format": VERIFY_FORMAT, "format_version": VERIFY_VERSION, "verify": verify.to_dict()})


def has_local(index_path: str | os.PathLike[str]) -> bool:
    """True when the index folder holds a local-feature store."""
    from ..local.store import MANIFEST

    return (Path(index_path) / LOCAL_DIR / MANIFEST).is_file()


def drop_local(index_path: str | os.PathLike[str]) -> None:
    """Remove the index's local features and verification setting (a rebuild without ``--verify``)."""
    from filelock import FileLock

    root = Path(index_path)
    save_verify(root, None)
    if (root / LOCAL_DIR).exists():
        with FileLock(str(root / LOCK_NAME)):
            shutil.rmtree(root / LOCAL_DIR, ignore_errors=True)


def _records(index: Any) -> list[tuple[int, str]]:
    """(id, path) of every indexed image of an :class:`cbir.index.Index` (or given pairs)."""
    if hasattr(index, "records"):
        return [(int(r.id), str(r.path)) for r in index.records()]
    return [(int(i), str(p)) for i, p in index]


def sync_local(
    index_path: str | os.PathLike[str],
    index: Any,
    *,
    settings: Any = None,
    refresh: Iterable[int] = (),
    progress: bool = False,
    workers: int = 1,
    device: str = "auto",
) -> dict[str, Any]:
    """Make ``INDEX/local`` hold the features of exactly the images of ``index`` (an Index, or
    (id, path) pairs): extract those missing (and those of ``refresh`` ids again, re-described
    images), remove those of ids no longer indexed. Creates the store with ``settings`` (a
    :class:`cbir.local.features.LocalFeatureSettings`, default its defaults) when there is none;
    an existing store keeps its own. Under the store's lock. Returns {"extracted", "removed",
    "unreadable" (id -> reason, this run), "images" (stored now), "settings"}."""
    from ..local.cache import writing
    from ..local.features import LocalFeatureSettings
    from ..local.store import extract_to_store

    root = Path(index_path)
    records = _records(index)
    ids = {str(i) for i, _ in records}
    refresh = {str(int(i)) for i in refresh}
    with writing(root / LOCAL_DIR, None if has_local(root) else (settings or LocalFeatureSettings()),
                 lock=root / LOCK_NAME) as store:
        stale = [k for k in list(store.keys()) + list(store.failed) if k not in ids or k in refresh]
        gone = sum(1 for k in store.keys() if k not in ids)
        if stale:
            store.remove(stale)
        todo = [(str(i), p) for i, p in records if str(i) not in store]
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), unit="img", desc="local features", dynamic_ncols=True)
        try:
            res = extract_to_store([p for _, p in todo], [k for k, _ in todo], None, store,
                                   progress=bar.update if bar else None, workers=workers, device=device)
        finally:
            if bar is not None:
                bar.close()
        return {"extracted": int(res["extracted"]), "removed": int(gone),
                "unreadable": dict(res["failed"]), "images": len(store), "settings": store.settings.key()}


def add_local(index_path: str | os.PathLike[str], records: Sequence[tuple[int, str]], *, device: str = "auto") -> dict:
    """Extract the features of the given (id, path) images into the index's store (nothing else
    changes; ids already stored are left as they are). Under the store's lock. Returns
    {"extracted", "unreadable"}. For one image added by the service; :func:`sync_local` for the rest."""
    from ..local.cache import writing
    from ..local.store import extract_to_store

    root = Path(index_path)
    if not has_local(root):
        return {"extracted": 0, "unreadable": {}}
    with writing(root / LOCAL_DIR, None, lock=root / LOCK_NAME) as store:
        res = extract_to_store([str(p) for _, p in records], [str(int(i)) for i, _ in records], None, store,
                               device=device)
    return {"extracted": int(res["extracted"]), "unreadable": dict(res["failed"])}


def remove_local(index_path: str | os.PathLike[str], ids: Iterable[int]) -> int:
    """Remove the features of ``ids`` from the index's store (under its lock); how many were stored."""
    from ..local.cache import writing

    root = Path(index_path)
    if not has_local(root):
        return 0
    with writing(root / LOCAL_DIR, None, lock=root / LOCK_NAME) as store:
        return store.remove([str(int(i)) for i in ids])


class LocalFeatures:
    """Read access to an index's local features for searches: ``get(id)`` -> features or None.

    Opens ``INDEX/local`` lazily and again whenever its manifest changed (another process added
    or removed images), at most every ``recheck`` seconds; a shard deleted under it by a writer
    is read again after one reopen. Thread-safe."""

    def __init__(self, index_path: str | os.PathLike[str], recheck: float = 0.5) -> None:
        self.root = Path(index_path)
        self.recheck = float(recheck)
        self._store: Any = None
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _manifest_stamp(self) -> tuple | None:
        from ..local.store import MANIFEST

        try:
            st = (self.root / LOCAL_DIR / MANIFEST).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def store(self, force: bool = False) -> Any:
        """The current :class:`cbir.local.store.LocalFeatureStore`, or None when the index has none."""
        import time

        from ..local.store import LocalFeatureStore

        with self._lock:
            now = time.monotonic()
            if not force and self._store is not None and now - self._checked < self.recheck:
                return self._store
            self._checked = now
            stamp = self._manifest_stamp()
            if stamp is None:
                self._store, self._stamp = None, None
            elif force or stamp != self._stamp or self._store is None:
                self._store, self._stamp = LocalFeatureStore(self.root / LOCAL_DIR), stamp
            return self._store

    @property
    def settings(self) -> Any:
        store = self.store()
        return None if store is None else store.settings

    def get(self, image_id: int) -> Any:
        """The features of an indexed image (None: not (yet) extracted, or unreadable)."""
        key = str(int(image_id))
        for attempt in range(2):
            store = self.store(force=attempt > 0)
            if store is None or key not in store:
                if attempt == 0 and store is not None:
                    continue  # perhaps added since the last look
                return None
            try:
                return store.get(key)
            except (FileNotFoundError, KeyError):  # a writer rewrote that shard meanwhile
                continue
        return None


def index_verifier(local: LocalFeatures, query: Any, *, verify_settings: Any = None, device: str = "auto",
                   keep: bool = False) -> Any:
    """A verifier for :func:`cbir.pipeline.searching.search_index`: ``verifier(0, ids)`` -> inlier
    counts of the one query against indexed images by id. ``query``: its
    :class:`cbir.local.features.LocalFeatures`, an int (the id of an indexed image), or a function
    that extracts them (called once, when the first candidates are verified: its time is counted
    in the verifier's ``feature_seconds``)."""
    from ..local.verifier import FeatureVerifier

    if isinstance(query, int) and not isinstance(query, bool):
        qid = int(query)
        lookup = lambda _i: local.get(qid)  # noqa: E731
    elif callable(query):
        lookup = lambda _i: query()  # noqa: E731
    else:
        lookup = lambda _i: query  # noqa: E731
    return FeatureVerifier(lookup, local.get, verify_settings, device=device, keep=keep)
