"""Photos added through the service: stored under ``INDEX/uploads/`` with the uploader's file name made safe.

A stored name is the uploaded name's stem reduced to ``[A-Za-z0-9._-]`` (at most 80 characters) with
the suffix of the format the bytes really have (``.jpg`` for JPEG, ...); a random 8-hex part is
added only when that name is taken. The same bytes uploaded twice are one image: the store knows
the sha256 of every file it holds. The store's total size is kept under a budget (``--max-store-gb``).
Files are written atomically (cbir.fileio) and follow the umask.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import unicodedata
from pathlib import Path

from ..fileio import atomic_write_bytes, sha256_file

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
        if self.root.is_dir():
            for f in sorted(self.root.resolve().iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    self._sizes[f] = f.stat().st_size
                    self._digests.setdefault(sha256_file(f), f)

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
            self._sizes[target] = len(data)
            self._digests[digest or hashlib.sha256(data).hexdigest()] = target
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
            try:
                path.unlink()
            except FileNotFoundError:
                pass
