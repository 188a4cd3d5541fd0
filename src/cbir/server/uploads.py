"""Photos added through the service: stored under ``INDEX/uploads/`` with the uploader's file name made safe.

A stored name is the uploaded name's stem reduced to ``[A-Za-z0-9._-]`` (at most 80 characters) with
the suffix of the format the bytes really have (``.jpg`` for JPEG, ...); a random 8-hex part is
added only when that name is taken. The same bytes uploaded twice are one image: the store knows
the sha256 of every file it holds. The store's total size is kept under a budget (``--max-store-gb``).
Files are written atomically (cbir.fileio) and follow the umask.

The digests are remembered beside the store, in ``INDEX/.uploads-digests.sqlite`` (name, size,
mtime_ns, sha256), so a service start hashes only files that are new or changed since (size or
modification time differ), not the whole store; the file is a cache: a damaged or missing one is
rebuilt by hashing.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import threading
import unicodedata
from pathlib import Path

from ..fileio import atomic_write_bytes, sha256_bytes, sha256_file

MAX_STEM = 80


def safe_name(filename: str | None, suffix: str) -> str:
    """``filename`` made safe to store: no folders, only ``[A-Za-z0-9._-]``, no leading dot, + ``suffix``.

    >>> safe_name("../../etc/Tour Eiffel (1).JPG", ".jpg")
    'Tour_Eiffel_1.jpg'
    """
    base = re.split(r"[\\/]", filename or "")[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    stem = re.sub(r"_+", "_", stem).strip("._-")[:MAX_STEM].rstrip("._-")
    return (stem or "upload") + suffix


class StoreFull(Exception):
    """Storing an upload would exceed the store's budget."""


class UploadStore:
    """The files under ``root`` (one folder): their total size, and which file holds which bytes (sha256)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._digests: dict[str, Path] = {}
        self._sizes: dict[Path, int] = {}
        self._cache: sqlite3.Connection | None = None
        if self.root.is_dir():
            known = self._read_cache()
            present = set()
            for f in sorted(self.root.resolve().iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    st = f.stat()
                    row = known.get(f.name)
                    if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns:
                        digest = row[2]
                    else:  # new, or changed since it was hashed
                        digest = sha256_file(f)
                        self._remember(f, digest)
                    present.add(f.name)
                    self._sizes[f] = st.st_size
                    self._digests.setdefault(digest, f)
            for name in known.keys() - present:  # files deleted while the service was down
                self._forget(self.root / name)

    # --- the digest cache -----------------------------------------------------------------------
    @property
    def digest_cache(self) -> Path:
        """The cache file: ``.<store folder name>-digests.sqlite`` beside the store folder."""
        return self.root.parent / f".{self.root.name}-digests.sqlite"

    def _connect(self) -> sqlite3.Connection | None:
        """The cache database (created on first use); None when it cannot be used (then nothing is cached)."""
        if self._cache is None:
            file = self.digest_cache
            for _ in range(2):
                conn = None
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    conn = sqlite3.connect(str(file), check_same_thread=False, isolation_level=None)
                    conn.execute("CREATE TABLE IF NOT EXISTS digests (name TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                                 "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL)")
                    conn.execute("SELECT name, size, mtime_ns, sha256 FROM digests LIMIT 1").fetchall()
                    self._cache = conn
                    break
                except sqlite3.DatabaseError:  # damaged: it is only a cache, start it again
                    if conn is not None:
                        conn.close()
                    file.unlink(missing_ok=True)
                except OSError:
                    return None
        return self._cache

    def _read_cache(self) -> dict[str, tuple[int, int, str]]:
        conn = self._connect()
        if conn is None:
            return {}
        try:
            return {str(n): (int(z), int(t), str(d)) for n, z, t, d in
                    conn.execute("SELECT name, size, mtime_ns, sha256 FROM digests")}
        except (sqlite3.DatabaseError, ValueError, TypeError):
            return {}

    def _remember(self, path: Path, digest: str) -> None:
        conn = self._connect()
        if conn is None:
            return
        st = path.stat()
        try:
            conn.execute("INSERT OR REPLACE INTO digests (name, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)",
                         (path.name, st.st_size, st.st_mtime_ns, digest))
        except sqlite3.DatabaseError:
            pass  # a cache: the next start hashes this file again

    def _forget(self, path: Path) -> None:
        if self._cache is not None:
            try:
                self._cache.execute("DELETE FROM digests WHERE name = ?", (path.name,))
            except sqlite3.DatabaseError:
                pass

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def find(self, digest: str) -> Path | None:
        """The stored file holding bytes with this sha256, if it is still there."""
        with self._lock:
            path = self._digests.get(digest)
        return path if path is not None and path.is_file() else None

    def put(self, data: bytes, filename: str | None, suffix: str, digest: str | None = None) -> Path:
        """Store ``data`` under the safe form of ``filename`` (a random part added if taken); its resolved path.
        ``digest``: the sha256 of ``data`` when the caller has it already.

        StoreFull when the budget would be exceeded. Callers serialise ``put`` with the index write lock.
        """
        with self._lock:
            used = sum(self._sizes.values())
            if self.max_bytes is not None and used + len(data) > self.max_bytes:
                raise StoreFull(f"the upload store is full ({used / 1e9:.3f} GB of {self.max_bytes / 1e9:.3f} GB "
                                f"used; remove images or start with a larger --max-store-gb)")
            name = safe_name(filename, suffix)
            target = self.root / name
            while target.exists():
                stem = name[: -len(suffix)] if suffix else name
                target = self.root / f"{stem}-{secrets.token_hex(4)}{suffix}"
            atomic_write_bytes(target, data)
            target = target.resolve()
            digest = digest or sha256_bytes(data)
            self._sizes[target] = len(data)
            self._digests[digest] = target
            self._remember(target, digest)
            return target

    def holds(self, path: str | os.PathLike[str]) -> bool:
        """True when ``path`` is a file of this store."""
        return Path(path).resolve().parent == self.root.resolve()

    def delete(self, path: str | os.PathLike[str]) -> None:
        """Delete a stored file (nothing if it is gone or not in the store)."""
        path = Path(path).resolve()
        if not self.holds(path):
            return
        with self._lock:
            self._sizes.pop(path, None)
            for d in [d for d, p in self._digests.items() if p == path]:
                del self._digests[d]
            self._forget(path)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
