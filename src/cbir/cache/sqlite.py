"""One best-effort write transaction for the cache's SQLite stores (digests, vectors).

The cache is an accelerator: a write that fails (a locked or damaged database, a full disk) is
rolled back and reported as False, never raised; the caller then simply has not cached.
"""

from __future__ import annotations

import sqlite3
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
