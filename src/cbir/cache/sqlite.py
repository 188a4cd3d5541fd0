"""The cache's SQLite stores (digests, vectors): one best-effort write transaction, one removal.

The cache is an accelerator: a write that fails (a locked or damaged database, a full disk) is
rolled back and reported as False, never raised; the caller then simply has not cached.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable


def write_transaction(con: sqlite3.Connection, body: Callable[[sqlite3.Connection], None]) -> bool:
    """``BEGIN IMMEDIATE``; ``body(con)``; ``COMMIT`` -> True, or ROLLBACK -> False on sqlite3.DatabaseError."""
    try:
        con.execute("BEGIN IMMEDIATE")
        body(con)
        con.execute("COMMIT")
        return True
    except sqlite3.DatabaseError:
        try:
            con.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass
        return False


def remove_db(file: Path) -> None:
    """Delete a SQLite database and its ``-wal`` / ``-shm`` companions (missing ones ignored)."""
    for suffix in ("", "-wal", "-shm"):
        try:
            Path(str(file) + suffix).unlink()
        except OSError:
            pass
