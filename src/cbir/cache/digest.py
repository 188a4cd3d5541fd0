"""Content digests of image and weight files, memoised so that a second run hashes nothing.

A file is named by the SHA-256 of its bytes (the same bytes at another path, or touched without
being changed, give the same digest). Hashing is fast but not free (an 800-photo set is ~150 MB),
so each digest is remembered in a small SQLite table keyed by what identifies one version of one
file on this machine: (absolute path, device, inode, size, mtime in ns). Any of those changing
means the file may have changed: it is hashed again. The table lives in the cache folder
(``digests.sqlite``, WAL, safe across processes); a damaged table is replaced, never trusted.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Sequence

from ..fileio import sha256_bytes, sha256_file
from ..paths import cache_dir
from .sqlite import remove_db, write_transaction

__all__ = ["default_cache_dir", "bytes_digest", "file_digest", "DigestMemo", "MEMO_NAME"]

MEMO_NAME = "digests.sqlite"
_SCHEMA_VERSION = 1


def default_cache_dir() -> Path:
    """The extraction cache folder: :func:`cbir.paths.cache_dir` ``("descriptors")`` (``$CBIR_CACHE``,
    else ``$XDG_CACHE_HOME/cbir/descriptors``)."""
    return cache_dir("descriptors")


#: Hex SHA-256 of bytes (:func:`cbir.fileio.sha256_bytes`): the content identity of an image.
bytes_digest = sha256_bytes


#: Hex SHA-256 of a file's bytes (:func:`cbir.fileio.sha256_file`, read in blocks).
file_digest = sha256_file


def _stamp(path: Path) -> tuple[str, int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class DigestMemo:
    """Digests of files by content, remembered per (path, device, inode, size, mtime_ns).

    ``DigestMemo(folder)`` keeps them in ``folder/digests.sqlite``; ``DigestMemo(None)`` only in
    memory (this process). :meth:`digests` hashes what it does not know and returns None for a
    file it cannot read (the caller's reader reports that file).
    """

    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        self.file = None if folder is None else Path(folder).expanduser() / MEMO_NAME
        self._mem: dict[tuple, str] = {}
        self.hashed = 0  # files hashed by this object (tests: a second run hashes none)

    # --- the table ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection | None:
        if self.file is None:
            return None
        for attempt in range(2):
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                con = sqlite3.connect(self.file, timeout=60, isolation_level=None)
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT)")
                con.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT, dev INTEGER, ino INTEGER, size INTEGER, "
                            "mtime_ns INTEGER, sha256 TEXT, seen INTEGER, PRIMARY KEY (path, dev, ino, size, mtime_ns))"
                            " WITHOUT ROWID")
                row = con.execute("SELECT value FROM info WHERE name = 'schema'").fetchone()
                if row is None:
                    con.execute("INSERT OR IGNORE INTO info VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
                elif row[0] != str(_SCHEMA_VERSION):
                    raise sqlite3.DatabaseError(f"digest table schema {row[0]!r}")
                return con
            except sqlite3.DatabaseError:  # damaged or foreign: start a new one (it only saves time)
                if attempt:
                    return None
                remove_db(self.file)
            except OSError:
                return None  # a read-only cache folder: hash every time
        return None

    # --- lookups -----------------------------------------------------------------------------
    def digest(self, path: str | os.PathLike[str]) -> str | None:
        return self.digests([path])[0]

    def digests(self, paths: Sequence[str | os.PathLike[str]]) -> list[str | None]:
        """The content digest of each file (None where it cannot be read)."""
        stamps = [_stamp(Path(p).absolute()) for p in paths]
        want = {s for s in stamps if s is not None and s not in self._mem}
        con = self._connect() if want else None
        try:
            if con is not None:
                self._read(con, want)
            fresh = []
            for s in [s for s in stamps if s is not None and s not in self._mem]:
                if s in self._mem:  # the same file twice in one call
                    continue
                try:
                    self._mem[s] = file_digest(s[0])
                except OSError:
                    continue
                self.hashed += 1
                fresh.append(s)
            if con is not None and fresh:
                self._write(con, fresh)
        finally:
            if con is not None:
                con.close()
        return [None if s is None else self._mem.get(s) for s in stamps]

    def _read(self, con: sqlite3.Connection, want: set[tuple]) -> None:
        by_path: dict[str, list[tuple]] = {}
        for s in want:
            by_path.setdefault(s[0], []).append(s)
        names = list(by_path)
        try:
            for i in range(0, len(names), 500):
                part = names[i:i + 500]
                rows = con.execute(f"SELECT path, dev, ino, size, mtime_ns, sha256 FROM digests WHERE path IN "
                                   f"({','.join('?' * len(part))})", part).fetchall()
                for path, dev, ino, size, mtime, sha in rows:
                    key = (path, dev, ino, size, mtime)
                    if key in want and isinstance(sha, str) and len(sha) == 64:
                        self._mem[key] = sha
        except sqlite3.DatabaseError:
            return

    def _write(self, con: sqlite3.Connection, fresh: Iterable[tuple]) -> None:
        now = int(time.time())

        def body(c: sqlite3.Connection) -> None:
            for s in fresh:
                c.execute("DELETE FROM digests WHERE path = ?", (s[0],))  # older versions of this path
                c.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?)", (*s, self._mem[s], now))

        write_transaction(con, body)

