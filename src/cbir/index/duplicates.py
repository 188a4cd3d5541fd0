"""One rule for a photo already in an index: **same bytes, same photo**.

A file whose content (SHA-256 of its bytes, :func:`cbir.fileio.sha256_file`) equals that of an indexed
image's file is that image, whatever its path or name: it is not given a new id, it is reported as a
duplicate of the indexed id. ``cbir index add`` (:func:`cbir.index.build.plan_add`) and the service's
``POST /images`` both ask :func:`indexed_copies`; a byte-identical copy at another path, a re-upload of
a photo added from the command line, and a photo added twice through the service are all caught.

Cost: the indexed files are ``stat``-ed and only those of a size some candidate has are hashed (two
JPEGs of exactly the same size are rare), through ``digest`` (e.g. a :class:`cbir.cache.digest.DigestMemo`
remembers the hash of an unchanged file between runs). An indexed file that is gone or unreadable is
no match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..fileio import sha256_file

__all__ = ["indexed_copies", "content_of"]

Digest = Callable[[str | os.PathLike[str]], "str | None"]


def content_of(path: str | os.PathLike[str], digest: Digest | None = None) -> tuple[str, int] | None:
    """(sha256, size in bytes) of a file, or None when it cannot be read."""
    try:
        size = os.stat(path).st_size
        sha = (digest or sha256_file)(path)
    except OSError:
        return None
    return None if sha is None else (sha, size)


def indexed_copies(index: Any, wanted: Mapping[str, int], *, digest: Digest | None = None,
                   known: Callable[[str], Path | None] | None = None) -> dict[str, int]:
    """{sha256: id} for each of ``wanted`` ({sha256: size in bytes}) whose bytes an indexed image's
    file holds (the lowest such id).

    ``known(sha256)``: a path already known to hold those bytes (the service's upload store), tried
    first; then the indexed files of a wanted size are hashed with ``digest`` (default
    :func:`cbir.fileio.sha256_file`)."""
    found: dict[str, int] = {}
    if known is not None:
        for sha in wanted:
            path = known(sha)
            i = None if path is None else index.id_of_path(str(path))
            if i is not None:
                found[sha] = int(i)
    rest = {sha: size for sha, size in wanted.items() if sha not in found}
    if not rest:
        return found
    sizes = set(rest.values())
    for rec in sorted(index.records(), key=lambda r: r.id):
        try:
            if os.stat(rec.path).st_size not in sizes:
                continue
        except OSError:
            continue
        got = content_of(rec.path, digest)
        if got is not None and got[0] in rest and got[0] not in found:
            found[got[0]] = int(rec.id)
            if len(found) == len(wanted):
                break
    return found
