"""One writer per index: an exclusive file lock held for the whole read-modify-write.

Every writer (``cbir index build/add/remove``, the service) changes an index like this::

    with open_for_write("photos.index") as index:   # lock, then load the NEWEST generation
        index.add(vectors, paths)                     # change it in memory
    # clean exit: a new generation is saved, then the lock is released (always released)

The lock is ``INDEX/.writer.lock`` (:class:`filelock.FileLock`: an OS lock, released by the kernel
when its process dies, so a killed writer never leaves the index locked). Because the generation
is loaded *after* the lock is taken, a writer always changes the latest state: no lost update.
Image ids come from a counter stored with each generation (``next_id`` in the metadata), so an id
is never given twice, even after removals. Readers do not lock: generations are immutable and the
manifest switch is atomic; :meth:`Index.reload_if_stale` moves a reader to the newest one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from .index import Index
from .persist import MANIFEST

LOCK_NAME = ".writer.lock"


class IndexLockedError(TimeoutError):
    """Another writer held the index's lock for longer than the timeout."""


def writer_lock(path: str | os.PathLike[str]) -> FileLock:
    """The exclusive writer lock of the index folder ``path`` (the folder is created if missing)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / LOCK_NAME))


@contextlib.contextmanager
def open_for_write(
    path: str | os.PathLike[str], *, index: Index | None = None, timeout: float = 600.0,
    device: str = "auto", **create_kwargs: Any,
) -> Iterator[Index]:
    """Lock ``path``, yield its newest generation for changes, save a new generation on clean exit.

    - ``index``: an open copy of this index (e.g. the service's); it is reused when it is the newest
      generation and reloaded in place otherwise, instead of loading a second copy.
    - ``create_kwargs`` (``dim``, ``kind``, ``params``, ``settings``): create a new empty index when
      ``path`` holds none yet; without them a missing index is a FileNotFoundError.
    - ``timeout`` seconds to wait for another writer (IndexLockedError after; negative = forever).

    On an exception inside the block nothing is saved (a reused ``index`` keeps its in-memory
    changes; reload it with ``reload_if_stale`` or discard it). The lock is always released.
    """
    root = Path(path)
    if not create_kwargs and not root.is_dir():
        raise FileNotFoundError(f"index not found: {root}")
    lock = writer_lock(root)
    try:
        lock.acquire(timeout=timeout)
    except Timeout as exc:
        raise IndexLockedError(
            f"{root} is being changed by another writer (lock {root / LOCK_NAME} held for over {timeout:g} s)"
        ) from exc
    try:
        exists = (root / MANIFEST).is_file()
        if index is not None and exists:
            if index.path is None or index.path.resolve() != root.resolve():
                raise ValueError(f"the open index given was not loaded from {root}")
            index.reload_if_stale()
            current = index
        elif exists:
            current = Index.load(root, device=device)
        elif create_kwargs:
            current = Index(device=device, **create_kwargs)
        else:
            raise FileNotFoundError(f"index not found: {root}")
        yield current
        current.save(root)
    finally:
        lock.release()
