"""The cache's one write transaction: all or nothing, never raises on a database error."""

from __future__ import annotations

import sqlite3

from cbir.cache.sqlite import write_transaction


def _db(tmp_path):
    con = sqlite3.connect(tmp_path / "t.sqlite", isolation_level=None)
    con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    return con


def test_commits_every_statement(tmp_path):
    con = _db(tmp_path)
    assert write_transaction(con, lambda c: c.executemany("INSERT INTO t VALUES (?, ?)", [(1, "a"), (2, "b")]))
    assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [(1, "a"), (2, "b")]


def test_a_failing_statement_rolls_back_the_earlier_ones(tmp_path):
    con = _db(tmp_path)

    def body(c):
        c.execute("INSERT INTO t VALUES (1, 'a')")
        c.execute("INSERT INTO t VALUES (2, NULL)")  # NOT NULL: sqlite3.IntegrityError (a DatabaseError)

    assert write_transaction(con, body) is False
    assert con.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
    assert write_transaction(con, lambda c: c.execute("INSERT INTO t VALUES (3, 'c')"))  # usable afterwards
    assert con.execute("SELECT k FROM t").fetchall() == [(3,)]


def test_remove_db_deletes_the_database_and_its_companions(tmp_path):
    from cbir.cache.sqlite import remove_db

    db = tmp_path / "t.sqlite"
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"t.sqlite{suffix}").write_bytes(b"x")
    (tmp_path / "other.sqlite").write_bytes(b"y")
    remove_db(db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite"]
    remove_db(db)  # nothing left: not an error
