"""Where ``cbir adapt`` keeps its mining work: a folder of the extraction cache per (photo folder, settings).

    CACHE/adapt-v1/<key>/     a :func:`cbir.sfm.verified.verified_pairs` work folder (global
                              descriptors, candidate pairs, local features, verification chunks, graph)

``key`` = the first 16 hex digits of the sha256 of the canonical JSON of {the photo folder's
resolved path, the :class:`cbir.sfm.settings.PairSettings`}: a rerun on the same folder with the
same settings resumes (or reads) the work; other settings get another folder. When the photos of
the folder changed (names, sizes or dates), the work folder is emptied and done again.
``cbir cache clear`` does not know these folders; delete ``CACHE/adapt-v1`` to free the space.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..sfm.settings import PairSettings, settings_digest

__all__ = ["WORK_FOLDER", "work_dir_for"]

#: The sub-folder of the cache holding adapt's work (layout version in the name).
WORK_FOLDER = "adapt-v1"


def work_dir_for(folder: str | os.PathLike[str], settings: PairSettings, cache_root: str | os.PathLike[str]) -> Path:
    """``CACHE/adapt-v1/<key>`` for the photos of ``folder`` mined with ``settings`` (module docstring)."""
    key = settings_digest({"folder": str(Path(folder).resolve()), "pairs": settings.to_dict()})[:16]
    return Path(cache_root).expanduser() / WORK_FOLDER / key
