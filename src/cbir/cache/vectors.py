"""The descriptor store of the extraction cache: one SQLite file per (model, weights, settings).

Layout (cache format :data:`cbir.cache.identity.CACHE_FORMAT_VERSION`)::

    CACHE/vectors-v1/<key>.sqlite      key = key_of(model identity + extraction settings)
        info(name, value)              format stamp, the key's fields (JSON), the model's describe()
        vectors(digest, box, dim, vec, check, used)
                                       one row per (image content SHA-256, crop box or ''):
                                       vec = float32 little-endian bytes, check = blake2b-64 of vec,
                                       used = last time it was read or written (seconds)

SQLite gives atomic transactions and concurrent readers/writers (WAL journal, a 60 s busy
timeout), so several processes may describe into one store. Values are raw float32 bytes read with
``np.frombuffer``: nothing in the file can run code. A row whose length, checksum or values are
wrong is ignored (a miss) and replaced by the next write; a file that is not a store of this format
and key is replaced. The folder is bounded by :func:`prune` (least recently used rows first,
``CBIR_CACHE_MAX_GB``, default 20) and listed/emptied by :func:`cache_info` / :func:`clear_cache`
(``cbir cache info|prune|clear``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .identity import CACHE_FORMAT_VERSION, key_of
from .sqlite import remove_db, write_transaction

__all__ = ["VectorCache", "ItemKey", "store_folder", "cache_info", "clear_cache", "prune", "max_cache_bytes",
           "FORMAT"]

FORMAT = "cbir-vector-cache"
ItemKey = tuple[str, str]  # (content digest, box text or "")
_CHUNK = 400  # rows per SELECT (SQLite's variable limit is 999 in old builds)


def store_folder(root: str | os.PathLike[str]) -> Path:
    """Where the stores of cache ``root`` live (the format version is in the name)."""
    return Path(root).expanduser() / f"vectors-v{CACHE_FORMAT_VERSION}"


def _check(blob: bytes) -> str:
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def max_cache_bytes() -> int:
    """The size cap of the cache folder: ``$CBIR_CACHE_MAX_GB`` GB (default 20)."""
    try:
        gb = float(os.environ.get("CBIR_CACHE_MAX_GB", "20"))
    except ValueError:
        gb = 20.0
    return int(gb * (1 << 30))


class VectorCache:
    """The rows of one (model, weights, settings) key: ``get`` (hits) and ``put`` (new rows).

    ``fields``: the plain-data identity hashed into the key (stored, and checked on open).
    ``about``: what to remember of the model (its ``describe()``), returned by :attr:`about`.
    """

    def __init__(self, root: str | os.PathLike[str], fields: dict[str, Any]) -> None:
        self.fields = json.loads(json.dumps(fields, sort_keys=True, default=str))
        self.key = key_of(self.fields)
        self.file = store_folder(root) / f"{self.key}.sqlite"
        self.about: dict[str, Any] | None = None
        self.rejected = 0  # damaged rows met by get()

    # --- opening (one connection per operation: nothing stays open between calls) -------------
    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection | None]:
        con = self._open()
        try:
            yield con
        finally:
            if con is not None:
                con.close()

    def _open(self) -> sqlite3.Connection | None:
        stamp = {"format": FORMAT, "format_version": str(CACHE_FORMAT_VERSION),
                 "key": json.dumps(self.fields, sort_keys=True)}
        for attempt in range(2):
            con = None
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                con = sqlite3.connect(self.file, timeout=60, isolation_level=None, check_same_thread=False)
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")
                con.execute("CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT)")
                con.execute("CREATE TABLE IF NOT EXISTS vectors (digest TEXT, box TEXT, dim INTEGER, vec BLOB, "
                            "check_ TEXT, used INTEGER, PRIMARY KEY (digest, box)) WITHOUT ROWID")
                info = dict(con.execute("SELECT name, value FROM info").fetchall())
                if not info:  # a new store: stamp it
                    con.execute("BEGIN IMMEDIATE")
                    con.executemany("INSERT OR IGNORE INTO info VALUES (?, ?)",
                                    [*stamp.items(), ("created", str(int(time.time())))])
                    con.execute("COMMIT")
                    info = dict(con.execute("SELECT name, value FROM info").fetchall())
                if any(info.get(k) != v for k, v in stamp.items()):
                    raise sqlite3.DatabaseError(f"{self.file} is not the store of this key and format")
                if info.get("about"):
                    try:
                        self.about = json.loads(info["about"])
                    except ValueError:
                        self.about = None
                return con
            except sqlite3.DatabaseError:  # damaged, foreign or another format: replaced (a cache, never trusted)
                if con is not None:
                    con.close()
                if attempt:
                    return None
                remove_db(self.file)
            except OSError:
                if con is not None:
                    con.close()
                return None  # a read-only cache folder: describe everything, keep nothing
        return None

    def close(self) -> None:
        """Nothing to release: each operation opens and closes its own connection."""

    def __enter__(self) -> "VectorCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- reading and writing -----------------------------------------------------------------
    def get(self, keys: Sequence[ItemKey]) -> dict[ItemKey, np.ndarray]:
        """The stored vectors of ``keys`` that are present and intact (others: absent)."""
        want = set(keys)
        out: dict[ItemKey, np.ndarray] = {}
        with self._connection() as con:
            if con is not None:
                self._get(con, want, out)
        return out

    def _get(self, con: sqlite3.Connection, want: set[ItemKey], out: dict[ItemKey, np.ndarray]) -> None:
        digests = sorted({d for d, _ in want})
        try:
            for i in range(0, len(digests), _CHUNK):
                part = digests[i:i + _CHUNK]
                rows = con.execute(f"SELECT digest, box, dim, vec, check_ FROM vectors WHERE digest IN "
                                   f"({','.join('?' * len(part))})", part).fetchall()
                for digest, box, dim, blob, check in rows:
                    key = (digest, box)
                    if key not in want:
                        continue
                    v = _decode(dim, blob, check)
                    if v is None:
                        self.rejected += 1
                    else:
                        out[key] = v
            if out:
                self._touch(con, list(out))
        except sqlite3.DatabaseError:
            out.clear()

    def put(self, items: Iterable[tuple[ItemKey, np.ndarray]], about: dict[str, Any] | None = None) -> int:
        """Store (key, vector) rows in one transaction (replacing damaged ones); returns how many."""
        now = int(time.time())
        rows = []
        for (digest, box), v in items:
            blob = np.ascontiguousarray(v, dtype="<f4").ravel().tobytes()
            rows.append((digest, box, int(np.asarray(v).size), blob, _check(blob), now))
        with self._connection() as con:
            return 0 if con is None else self._put(con, rows, about)

    def _put(self, con: sqlite3.Connection, rows: list[tuple], about: dict[str, Any] | None) -> int:
        def body(c: sqlite3.Connection) -> None:
            c.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?, ?)", rows)
            if about is not None:
                c.execute("INSERT OR REPLACE INTO info VALUES ('about', ?)", (json.dumps(about, default=str),))

        if not write_transaction(con, body):
            return 0
        if about is not None:
            self.about = json.loads(json.dumps(about, default=str))
        return len(rows)

    def _touch(self, con: sqlite3.Connection, keys: list[ItemKey]) -> None:
        now = int(time.time())
        write_transaction(con, lambda c: c.executemany(
            "UPDATE vectors SET used = ? WHERE digest = ? AND box = ? AND used < ?",
            [(now, d, b, now - 60) for d, b in keys]))


def _decode(dim: Any, blob: Any, check: Any) -> np.ndarray | None:
    """The float32 vector of a row, or None when the row is damaged (length, checksum, values)."""
    if not isinstance(dim, int) or dim <= 0 or not isinstance(blob, bytes) or len(blob) != 4 * dim:
        return None
    if check != _check(blob):
        return None
    v = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return v if np.all(np.isfinite(v)) else None



# --- maintenance -------------------------------------------------------------------------------
def _stores(root: str | os.PathLike[str]) -> list[Path]:
    folder = store_folder(root)
    return sorted(folder.glob("*.sqlite")) if folder.is_dir() else []


def _bytes_on_disk(file: Path) -> int:
    return sum(Path(str(file) + s).stat().st_size for s in ("", "-wal") if Path(str(file) + s).exists())


def cache_info(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One dict per store under ``root``: file, bytes, rows, last use, and its key's fields."""
    out = []
    for file in _stores(root):
        rec: dict[str, Any] = {"file": str(file), "bytes": _bytes_on_disk(file)}
        try:
            con = sqlite3.connect(f"file:{file}?mode=ro", uri=True, timeout=10)
            try:
                info = dict(con.execute("SELECT name, value FROM info").fetchall())
                rows, used = con.execute("SELECT COUNT(*), MAX(used) FROM vectors").fetchone()
            finally:
                con.close()
            rec.update(rows=int(rows), last_used=used, key=json.loads(info.get("key") or "null"),
                       format_version=info.get("format_version"))
        except (sqlite3.DatabaseError, ValueError) as exc:
            rec.update(rows=None, damaged=str(exc))
        out.append(rec)
    return out


def clear_cache(root: str | os.PathLike[str], older_than_days: float | None = None) -> int:
    """Delete every store under ``root`` (or only the rows unused for ``older_than_days``); returns
    the number of rows (stores: their rows) removed."""
    removed = 0
    for file in _stores(root):
        try:
            con = sqlite3.connect(file, timeout=60, isolation_level=None)
            try:
                if older_than_days is None:
                    removed += con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
                else:
                    cut = int(time.time() - older_than_days * 86400)
                    removed += con.execute("DELETE FROM vectors WHERE used < ?", (cut,)).rowcount
                    con.execute("VACUUM")
            finally:
                con.close()
        except sqlite3.DatabaseError:
            pass
        if older_than_days is None:
            remove_db(file)
    return removed


def prune(root: str | os.PathLike[str], max_bytes: int | None = None) -> int:
    """Delete least recently used rows across the stores of ``root`` until they take at most
    ``max_bytes`` (default :func:`max_cache_bytes`); returns the number of rows removed."""
    cap = max_cache_bytes() if max_bytes is None else int(max_bytes)
    files = _stores(root)
    total = sum(_bytes_on_disk(f) for f in files)
    if total <= cap:
        return 0
    rows: list[tuple[int, int, Path, str, str]] = []
    for file in files:
        try:
            con = sqlite3.connect(file, timeout=60)
            try:
                rows += [(int(u or 0), int(n), file, d, b) for d, b, n, u in
                         con.execute("SELECT digest, box, length(vec) + 120, used FROM vectors").fetchall()]
            finally:
                con.close()
        except sqlite3.DatabaseError:
            remove_db(file)
    rows.sort(key=lambda r: r[0])
    excess, drop = total - cap, {}
    for used, size, file, d, b in rows:
        if excess <= 0:
            break
        drop.setdefault(file, []).append((d, b))
        excess -= size
    for file, keys in drop.items():
        try:
            con = sqlite3.connect(file, timeout=60, isolation_level=None)
            try:
                con.execute("BEGIN IMMEDIATE")
                con.executemany("DELETE FROM vectors WHERE digest = ? AND box = ?", keys)
                con.execute("COMMIT")
                con.execute("VACUUM")
            finally:
                con.close()
        except sqlite3.DatabaseError:
            pass
    return sum(len(k) for k in drop.values())
