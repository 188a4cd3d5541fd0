"""Where ``cbir adapt`` keeps its mining work: a folder of the extraction cache per (photo folder, settings).

    CACHE/adapt-v1/<key>/     a :func:`cbir.sfm.verified.verified_pairs` work folder (global
                              descriptors, candidate pairs, local features, verification chunks, graph)

``key`` = the first 16 hex digits of the sha256 of the canonical JSON of {the photo folder's
resolved path, the :class:`cbir.sfm.settings.PairSettings`}: a rerun on the same folder with the
same settings resumes (or reads) the work; other settings get another folder. When the photos of
the folder changed (names, sizes or dates), the work folder is emptied and done again.
``cbir cache info`` lists these folders (:func:`adapt_work_info`) and ``cbir cache clear`` deletes them
(:func:`clear_adapt_work`): the next ``cbir adapt`` mines again.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..sfm.settings import PairSettings, settings_digest

__all__ = ["WORK_FOLDER", "work_dir_for", "adapt_work_info", "clear_adapt_work"]

#: The sub-folder of the cache holding adapt's work (layout version in the name).
WORK_FOLDER = "adapt-v1"


def work_dir_for(folder: str | os.PathLike[str], settings: PairSettings, cache_root: str | os.PathLike[str]) -> Path:
    """``CACHE/adapt-v1/<key>`` for the photos of ``folder`` mined with ``settings`` (module docstring)."""
    key = settings_digest({"folder": str(Path(folder).resolve()), "pairs": settings.to_dict()})[:16]
    return Path(cache_root).expanduser() / WORK_FOLDER / key


def adapt_work_info(cache_root: str | os.PathLike[str]) -> list[dict]:
    """One dict per work folder under ``CACHE/adapt-v1``: ``{"path", "key", "bytes"}`` (bytes on disk)."""
    folder = Path(cache_root).expanduser() / WORK_FOLDER
    if not folder.is_dir():
        return []
    return [{"path": str(p), "key": p.name, "bytes": sum(f.stat().st_size for f in p.rglob("*") if f.is_file())}
            for p in sorted(q for q in folder.iterdir() if q.is_dir())]


def clear_adapt_work(cache_root: str | os.PathLike[str]) -> int:
    """Delete every work folder under ``CACHE/adapt-v1``; returns how many were deleted."""
    import shutil

    work = adapt_work_info(cache_root)
    for rec in work:
        shutil.rmtree(rec["path"], ignore_errors=True)
    return len(work)
