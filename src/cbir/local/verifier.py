"""The verifier the re-ranking chain asks for: inlier counts of (query, candidate) pairs from local features.

:func:`cbir.rerank.compose.rerank` (and ``Rerank.apply``) takes a *verifier*, a callable
``(query row, candidate database rows (K,)) -> inlier counts (K,)``, so that the pure re-ranking
library does no I/O. :class:`FeatureVerifier` is that callable over two lookups, ``query_features(i)``
and ``db_features(row)`` (each a :class:`cbir.local.features.LocalFeatures`, or None when the image
has none, e.g. a distractor: 0 inliers), with :func:`cbir.local.verify.verify_candidates` (COLMAP's
matching rule, batched, then RANSAC) for the pairs it has not seen yet: each pair is verified once
(``cbir tune`` asks for the same pairs under many settings).

**The query's own photo.** A candidate whose local features are identical to the query's
(:func:`same_features`: same image size, keypoints and descriptors, i.e. the same pixels in the
same crop, which SIFT turns into the same features) is the query itself, e.g. a Holidays query,
which is also one of the database photos, or ``cbir search --id``. It gets
:data:`cbir.rerank.compose.SAME_IMAGE` (-1) instead of an inlier count: the chain orders it as a
verified image but never expands the query with it (adding the query to itself would only halve
the weight of the real verified matches).

Where the features come from: :func:`cbir.pipeline.verifying.benchmark_verifier` (a benchmark's
images, through the local-feature cache), :mod:`cbir.index.local` (an index's stored features).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from .features import LocalFeatures
from .verify import Verification, VerifySettings

__all__ = ["FeatureVerifier", "same_features", "correspondences", "SAME_IMAGE"]

#: The count given to the query's own photo (= :data:`cbir.rerank.compose.SAME_IMAGE`; kept here
#: so that this module does not import the re-ranking package).
SAME_IMAGE = -1

Lookup = Callable[[int], "LocalFeatures | None"]


def same_features(a: LocalFeatures, b: LocalFeatures) -> bool:
    """True when ``a`` and ``b`` are the features of the same image (same size, keypoints and
    descriptors, bit for bit); two empty sets are not the same image (nothing to compare)."""
    return (len(a) == len(b) and len(a) > 0 and tuple(a.size) == tuple(b.size)
            and np.array_equal(a.keypoints, b.keypoints) and np.array_equal(a.descriptors, b.descriptors))


def correspondences(query: LocalFeatures, candidate: LocalFeatures, v: Verification) -> np.ndarray:
    """The inlier correspondences of a verification as (M, 4) float32 rows ``x_q, y_q, x_c, y_c``:
    keypoint positions in each image's own pixels (the whole decoded image, corner origin)."""
    m = np.asarray(v.matches, dtype=np.int64).reshape(-1, 2)
    if not len(m):
        return np.zeros((0, 4), dtype=np.float32)
    return np.concatenate([query.keypoints[m[:, 0], :2], candidate.keypoints[m[:, 1], :2]], axis=1).astype(np.float32)


class FeatureVerifier:
    """``verifier(i, rows) -> inlier counts`` over ``query_features(i)`` and ``db_features(row)``
    (module doc). ``keep``: also keep each pair's inlier correspondences (for :meth:`matches`:
    drawing why a result matched; 16 bytes an inlier).

    ``pairs`` verified, ``missing`` (pairs where either image had no features), ``seconds`` spent
    matching and in RANSAC, ``query_seconds`` getting the queries' features (extracting them, for a
    new photo), ``feature_seconds`` reading the candidates', are counted as it runs.
    """

    def __init__(self, query_features: Lookup, db_features: Lookup, settings: VerifySettings | None = None, *,
                 device: str = "auto", keep: bool = False) -> None:
        self.query_features = query_features
        self.db_features = db_features
        self.settings = settings or VerifySettings()
        self.device = device
        self.keep = keep
        self._counts: dict[tuple[int, int], int] = {}
        self._kept: dict[tuple[int, int], tuple[np.ndarray, tuple[int, int], tuple[int, int]]] = {}
        self._query: tuple[int, LocalFeatures | None] | None = None
        self.pairs = 0
        self.missing = 0
        self.seconds = 0.0
        self.feature_seconds = 0.0
        self.query_seconds = 0.0

    def query_of(self, i: int) -> LocalFeatures | None:
        """The features of query ``i`` (looked up once in a row of calls for the same query)."""
        if self._query is None or self._query[0] != i:
            t0 = time.perf_counter()
            self._query = (i, self.query_features(i))
            self.query_seconds += time.perf_counter() - t0
        return self._query[1]

    def __call__(self, i: int, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = [int(r) for r in np.asarray(rows, dtype=np.int64).reshape(-1)]
        todo = [r for r in dict.fromkeys(rows) if (int(i), r) not in self._counts]
        if todo:
            self._verify(int(i), todo)
        return np.asarray([self._counts[(int(i), r)] for r in rows], dtype=np.int64)

    def _verify(self, i: int, rows: list[int]) -> None:
        from .verify import verify_candidates

        q = self.query_of(i)
        t0 = time.perf_counter()
        feats = [self.db_features(r) for r in rows]
        self.feature_seconds += time.perf_counter() - t0
        if q is None:
            self.missing += len(rows)
            self._counts.update({(i, r): 0 for r in rows})
            return
        real: list[int] = []
        for r, f in zip(rows, feats):
            if f is None:
                self.missing += 1
                self._counts[(i, r)] = 0
            elif same_features(q, f):
                self._counts[(i, r)] = SAME_IMAGE
            else:
                real.append(r)
        if not real:
            return
        cand = [feats[rows.index(r)] for r in real]
        t0 = time.perf_counter()
        counts, details = verify_candidates(q, cand, self.settings, details=True, device=self.device)
        self.seconds += time.perf_counter() - t0
        self.pairs += len(real)
        for r, n, v, f in zip(real, counts, details, cand):
            self._counts[(i, r)] = int(n)
            if self.keep:  # the correspondences only (M x 16 bytes), not the features
                self._kept[(i, r)] = (correspondences(q, f, v), tuple(q.size), tuple(f.size))

    def count(self, i: int, row: int) -> int | None:
        """The inlier count of a pair already verified (None if it was not)."""
        return self._counts.get((int(i), int(row)))

    def matches(self, i: int, row: int) -> np.ndarray | None:
        """(M, 4) float32 inlier correspondences ``x_q, y_q, x_c, y_c`` of a verified pair (``keep``
        needed), the identity on the query's keypoints for its own photo, None if not verified."""
        n = self.count(i, row)
        if n is None:
            return None
        if n == SAME_IMAGE:
            q = self.query_of(int(i))
            xy = q.keypoints[:, :2] if q is not None else np.zeros((0, 2), np.float32)
            return np.concatenate([xy, xy], axis=1).astype(np.float32)
        kept = self._kept.get((int(i), int(row)))
        return np.zeros((0, 4), dtype=np.float32) if kept is None else kept[0]

    def size_of(self, i: int, row: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """((w, h) of the query, (w, h) of the candidate) of a kept pair: the frames of :meth:`matches`."""
        kept = self._kept.get((int(i), int(row)))
        return None if kept is None else (kept[1], kept[2])

    def stats(self) -> dict[str, float | int]:
        """Counters: pairs verified, missing, seconds (matching + RANSAC), query_seconds, feature_seconds."""
        return {"pairs": self.pairs, "missing": self.missing, "seconds": round(self.seconds, 4),
                "query_seconds": round(self.query_seconds, 4), "feature_seconds": round(self.feature_seconds, 4)}
