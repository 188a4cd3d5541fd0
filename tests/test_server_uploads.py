"""The upload store (cbir.server.uploads): duplicates found by sha256, and a restart that hashes
only what changed (the digest cache beside the store)."""

from __future__ import annotations

import hashlib
import os

import pytest

import cbir.server.uploads as uploads
from cbir.server.uploads import StoreFull, UploadStore


@pytest.fixture()
def hashed(monkeypatch):
    """The files the store hashes from disk, in order."""
    seen: list[str] = []
    real = uploads.sha256_file

    def counting(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(uploads, "sha256_file", counting)
    return seen


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_restart_hashes_only_new_or_changed_files(tmp_path, hashed):
    root = tmp_path / "index" / "uploads"
    store = UploadStore(root)
    a = store.put(b"A" * 1000, "a.jpg", ".jpg")
    b = store.put(b"B" * 2000, "b.jpg", ".jpg")
    assert store.find(digest(b"A" * 1000)) == a and store.find(digest(b"B" * 2000)) == b
    assert sorted(p.name for p in root.iterdir()) == ["a.jpg", "b.jpg"]  # the cache lives beside the store
    assert store.digest_cache.is_file() and hashed == []

    again = UploadStore(root)
    assert hashed == [] and again.find(digest(b"A" * 1000)) == a and again.used_bytes == 3000

    # a file copied in by hand, and one changed on disk (same size, new content, new mtime)
    (root / "c.jpg").write_bytes(b"C" * 10)
    b.write_bytes(b"b" * 2000)
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = UploadStore(root)
    assert sorted(hashed) == ["b.jpg", "c.jpg"]
    assert third.find(digest(b"b" * 2000)) == b and third.find(digest(b"B" * 2000)) is None
    assert third.find(digest(b"C" * 10)) == (root / "c.jpg").resolve()

    # a deleted file leaves the cache; the next start hashes nothing
    third.delete(a)
    hashed.clear()
    fourth = UploadStore(root)
    assert hashed == [] and fourth.find(digest(b"A" * 1000)) is None and fourth.used_bytes == 2010


def test_a_damaged_cache_is_rebuilt_by_hashing(tmp_path, hashed):
    root = tmp_path / "uploads"
    store = UploadStore(root)
    a = store.put(b"A" * 100, "a.jpg", ".jpg")
    store.digest_cache.write_bytes(b"not a database at all" * 50)
    again = UploadStore(root)
    assert hashed == ["a.jpg"] and again.find(digest(b"A" * 100)) == a
    hashed.clear()
    assert UploadStore(root).find(digest(b"A" * 100)) == a and hashed == []  # cached again


def test_the_budget_counts_every_stored_byte(tmp_path):
    store = UploadStore(tmp_path / "uploads", max_bytes=150)
    store.put(b"x" * 100, "x.jpg", ".jpg")
    with pytest.raises(StoreFull, match="full"):
        store.put(b"y" * 100, "y.jpg", ".jpg")
    assert UploadStore(tmp_path / "uploads", max_bytes=150).used_bytes == 100
