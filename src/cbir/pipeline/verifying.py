"""A benchmark's local features and the verifier built on them (``cbir evaluate --verify``, ``cbir tune``).

:func:`benchmark_verifier` extracts the SIFT features of the benchmark's images through the
local-feature cache (:mod:`cbir.local.cache`: once per image content, crop box and settings; a
second run extracts nothing) and returns the verifier the re-ranking chain asks for
(:class:`cbir.local.verifier.FeatureVerifier`): ``verifier(query row, database rows)`` -> inlier
counts. Queries are cropped to their box as the global descriptors are (``crop``); a whole-image
query that is also a database photo (Holidays) has that photo's features, so the verifier sees
it as the query's own photo (:data:`cbir.rerank.compose.SAME_IMAGE`): never a verified expansion
of itself. Database rows past the benchmark's (distractors appended by ``score``) have no local
features: 0 inliers.
"""

from __future__ import annotations

import os
from typing import Any

from .benchmark import Benchmark

__all__ = ["benchmark_local_features", "benchmark_verifier", "verify_of"]


def verify_of(settings: Any) -> Any:
    """The :class:`cbir.rerank.verify.VerifyParams` of a Rerank or Recipe (None: no verification)."""
    if settings is None:
        return None
    return getattr(settings, "verify", None)


def benchmark_local_features(bench: Benchmark, *, settings: Any = None, cache_dir: str | os.PathLike[str] | None = None,
                             crop: bool = True, progress: bool = False, workers: int = 1,
                             device: str = "auto") -> tuple[Any, Any]:
    """(database, queries) :class:`cbir.local.cache.CachedFeatures` of ``bench`` (queries cropped to
    their box when ``crop``), extracted in one pass through the cache ``cache_dir`` (default
    cbir's cache folder) with ``settings`` (a :class:`cbir.local.features.LocalFeatureSettings`,
    default its defaults). The database result's ``extracted`` / ``from_cache`` count both."""
    from pathlib import Path

    from ..local.cache import CachedFeatures, extract_cached

    missing = next((p for p in list(bench.db_paths) + list(bench.query_paths) if not Path(p).is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"spatial verification needs the images of {bench.name} (their local features): "
                                f"not found: {missing}")
    n = len(bench.db_paths)
    boxes = [None] * n + (list(bench.query_bboxes) if crop else [None] * len(bench.query_paths))
    res = extract_cached(list(bench.db_paths) + list(bench.query_paths), boxes, settings=settings, root=cache_dir,
                         progress=progress, workers=workers, device=device, desc=f"{bench.name} local features")
    db = CachedFeatures(res.store, res.keys[:n], res.extracted, res.from_cache, res.failed, res.seconds)
    q = CachedFeatures(res.store, res.keys[n:], 0, 0, {}, 0.0)
    return db, q


def benchmark_verifier(bench: Benchmark, *, settings: Any = None, verify_settings: Any = None,
                       cache_dir: str | os.PathLike[str] | None = None, crop: bool = True, progress: bool = False,
                       workers: int = 1, device: str = "auto", keep: bool = False) -> Any:
    """The verifier of ``bench`` (module doc): a :class:`cbir.local.verifier.FeatureVerifier` whose
    ``extraction`` attribute is the database's :class:`cbir.local.cache.CachedFeatures` (what was
    extracted, what came from the cache). ``verify_settings``: RANSAC and matching
    (:class:`cbir.local.verify.VerifySettings`, default its defaults); ``keep``: keep each pair's
    correspondences (for drawing them)."""
    from ..local.verifier import FeatureVerifier

    db, q = benchmark_local_features(bench, settings=settings, cache_dir=cache_dir, crop=crop, progress=progress,
                                     workers=workers, device=device)
    n = len(db.keys)
    verifier = FeatureVerifier(q.get, lambda row: db.get(row) if 0 <= row < n else None, verify_settings,
                               device=device, keep=keep)
    verifier.extraction = db
    return verifier
