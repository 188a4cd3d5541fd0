"""The index's truth: the descriptor matrix by id (``VectorStore``) and image metadata in SQLite.

The SQLite database is held in memory while an index is open and written to a file with the
sqlite backup API when the index is saved, so it moves with the atomic generation switch of
:mod:`cbir.index.index` (a crash mid-save never leaves the metadata ahead of the vectors).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..fileio import FormatError


class VectorStore:
    """ids (N,) int64 and vectors (N, D) float32; row i of ``vectors`` belongs to ``ids[i]``."""

    def __init__(self, dim: int, ids: np.ndarray | None = None, vectors: np.ndarray | None = None) -> None:
        self.dim = int(dim)
        self.ids = np.zeros(0, np.int64) if ids is None else np.asarray(ids, np.int64)
        self.vectors = np.zeros((0, self.dim), np.float32) if vectors is None else np.asarray(vectors, np.float32)
        if self.vectors.shape != (len(self.ids), self.dim):
            raise ValueError(f"{len(self.ids)} ids for vectors of shape {self.vectors.shape} (dimension {self.dim})")
        self._row = {int(i): r for r, i in enumerate(self.ids.tolist())}
        if len(self._row) != len(self.ids):
            raise ValueError("vector ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, id_: int) -> bool:
        return int(id_) in self._row

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (any shape); KeyError naming the first unknown id."""
        flat = np.asarray(ids, np.int64).ravel().tolist()
        try:
            rows = [self._row[i] for i in flat]
        except KeyError as exc:
            raise KeyError(f"image id {exc.args[0]} is not in the index") from None
        return np.asarray(rows, np.int64).reshape(np.shape(ids))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        vectors = np.asarray(vectors, np.float32)
        dup = [int(i) for i in ids if int(i) in self._row]
        if dup:
            raise ValueError(f"image id {dup[0]} is already in the index")
        start = len(self.ids)
        self.ids = np.concatenate([self.ids, ids])
        self.vectors = np.concatenate([self.vectors, vectors]) if start else np.array(vectors, np.float32, copy=True)
        for r, i in enumerate(ids.tolist()):
            self._row[i] = start + r

    def remove(self, ids: np.ndarray) -> None:
        rows = self.rows_of(ids)
        keep = np.ones(len(self.ids), bool)
        keep[rows] = False
        self.ids = self.ids[keep]
        self.vectors = self.vectors[keep]
        self._row = {int(i): r for r, i in enumerate(self.ids.tolist())}


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: str
    added: float
    updated: float | None = None
    width: int | None = None
    height: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "added": self.added, "updated": self.updated,
                "width": self.width, "height": self.height}


SCHEMA = """
CREATE TABLE IF NOT EXISTS images(
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    added REAL NOT NULL,
    updated REAL,
    width INTEGER,
    height INTEGER
);
CREATE TABLE IF NOT EXISTS info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = "id, path, added, updated, width, height"


class MetadataDB:
    """Image metadata (id, path, added time, size) in an in-memory SQLite database."""

    def __init__(self, conn: sqlite3.Connection | None = None) -> None:
        self.conn = conn or sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self.conn.isolation_level = None  # autocommit; multi-row changes use explicit transactions
        self.conn.executescript(SCHEMA)

    # --- persistence ----------------------------------------------------------------------
    @classmethod
    def load(cls, file: Path) -> "MetadataDB":
        if not file.is_file():
            raise FormatError(f"index metadata not found: {file}")
        mem = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        try:
            src = sqlite3.connect(f"file:{file}?mode=ro", uri=True)
            try:
                src.backup(mem)
            finally:
                src.close()
            mem.execute(f"SELECT {_COLUMNS} FROM images LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            mem.close()
            raise FormatError(f"{file} is damaged or not an index metadata database: {exc}") from exc
        return cls(mem)

    def save(self, file: Path) -> None:
        dst = sqlite3.connect(str(file))
        try:
            self.conn.backup(dst)
            dst.commit()
        finally:
            dst.close()

    # --- ids ------------------------------------------------------------------------------
    def peek_next_id(self) -> int:
        """The id the next added image would get: max(stored counter, highest id + 1); nothing consumed."""
        row = self.conn.execute("SELECT value FROM info WHERE key='next_id'").fetchone()
        start = int(row[0]) if row else 0
        top = self.conn.execute("SELECT MAX(id) FROM images").fetchone()[0]
        return max(start, (top + 1) if top is not None else 0)

    def reserve_ids_below(self, first: int) -> None:
        """Never give an id below ``first`` (a rebuilt index continues the numbering of the one it replaces)."""
        start = max(self.peek_next_id(), int(first))
        self.conn.execute("INSERT OR REPLACE INTO info(key, value) VALUES('next_id', ?)", (str(start),))

    def next_ids(self, n: int) -> np.ndarray:
        """n fresh ids, never reused even after removals."""
        start = self.peek_next_id()
        self.conn.execute("INSERT OR REPLACE INTO info(key, value) VALUES('next_id', ?)", (str(start + n),))
        return np.arange(start, start + n, dtype=np.int64)

    # --- records --------------------------------------------------------------------------
    def insert(self, ids: Iterable[int], paths: Iterable[str], sizes: Iterable[tuple[int, int] | None] | None = None) -> None:
        now = time.time()
        ids, paths = list(ids), list(paths)
        sizes = list(sizes) if sizes is not None else [None] * len(ids)
        rows = [(int(i), str(p), now, None, *(s if s else (None, None))) for i, p, s in zip(ids, paths, sizes)]
        self.conn.execute("BEGIN")
        try:
            self.conn.executemany(f"INSERT INTO images({_COLUMNS}) VALUES(?,?,?,?,?,?)", rows)
        except sqlite3.IntegrityError as exc:
            self.conn.execute("ROLLBACK")
            raise ValueError(f"cannot add: {exc} (a path or id is already in the index)") from exc
        self.conn.execute("COMMIT")

    def update(self, id_: int, path: str | None = None, size: tuple[int, int] | None = None) -> None:
        rec = self.get(id_)
        w, h = size if size else (rec.width, rec.height)
        self.conn.execute(
            "UPDATE images SET path=?, updated=?, width=?, height=? WHERE id=?",
            (path or rec.path, time.time(), w, h, int(id_)),
        )

    def delete(self, ids: Iterable[int]) -> None:
        self.conn.execute("BEGIN")
        self.conn.executemany("DELETE FROM images WHERE id=?", [(int(i),) for i in ids])
        self.conn.execute("COMMIT")

    def get(self, id_: int) -> ImageRecord:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM images WHERE id=?", (int(id_),)).fetchone()
        if row is None:
            raise KeyError(f"image id {id_} is not in the index")
        return ImageRecord(*row)

    def paths(self, ids: Iterable[int]) -> dict[int, str]:
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            q = f"SELECT id, path FROM images WHERE id IN ({','.join('?' * len(part))})"
            out.update(self.conn.execute(q, part).fetchall())
        return out

    def id_of_path(self, path: str) -> int | None:
        row = self.conn.execute("SELECT id FROM images WHERE path=?", (str(path),)).fetchone()
        return None if row is None else int(row[0])

    def records(self, limit: int | None = None, offset: int = 0) -> list[ImageRecord]:
        q = f"SELECT {_COLUMNS} FROM images ORDER BY id LIMIT ? OFFSET ?"
        return [ImageRecord(*r) for r in self.conn.execute(q, (-1 if limit is None else int(limit), int(offset)))]

    def all_ids(self) -> np.ndarray:
        return np.asarray([r[0] for r in self.conn.execute("SELECT id FROM images ORDER BY id")], np.int64)

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
