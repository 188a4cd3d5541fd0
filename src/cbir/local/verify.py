"""Geometric verification: how many matches one geometric model explains (the inlier count).

Tentative matches (:mod:`cbir.local.matching`) are checked by RANSAC through pycolmap (LO-RANSAC):

- ``"homography"``: x2 ~ H x1, inlier iff the transfer error |x2 - H(x1)| <= t
  (``pycolmap.estimate_homography_matrix``; a planar scene, or any scene seen from one place);
- ``"fundamental"``: x2^T F x1 = 0, inlier iff the Sampson distance <= t
  (``pycolmap.estimate_fundamental_matrix``; any rigid scene, a weaker test: a point may slide
  along its epipolar line);
- ``"two_view"``: COLMAP's two-view geometry (``pycolmap.estimate_two_view_geometry``: E, F and
  H estimated, the configuration chosen, watermarks detected), cameras SIMPLE_PINHOLE with focal
  1.2 max(w, h) and the principal point at the image centre (COLMAP's default guess).

The threshold t is ``max_error`` pixels of the images the features were found in, i.e.
``max_error * sqrt(s1 * s2)`` in keypoint units (``LocalFeatures.scale``). A pair with fewer than
``min_matches`` tentative matches is not tried (0 inliers): it could not reach the usual 15
inliers, and RANSAC on a few random matches runs up to ``max_trials`` iterations for nothing.
RANSAC is seeded (``seed``): the same pair gives the same inliers.

Which model: ``benchmarks/verify_rerank.py`` measured precision and recall of each on real pairs
(docs in that script); the default is the one it chose.

Entry points: :func:`verify` (one pair), :func:`verify_candidates` (one query against its top-K,
matching batched), :func:`verify_pairs` (a list of pairs from a store, for mining).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .features import LocalFeatures
from .matching import MatchSettings, match_many

if TYPE_CHECKING:
    from .store import LocalFeatureStore

__all__ = ["VerifySettings", "Verification", "verify", "verify_candidates", "verify_pairs", "MODELS"]

MODELS = ("homography", "fundamental", "two_view")
#: Fewest matches each model can be estimated from.
MIN_SAMPLE = {"homography": 4, "fundamental": 8, "two_view": 8}


class VerifySettings(BaseModel):
    """RANSAC model and its options (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Literal["homography", "fundamental", "two_view"] = "two_view"
    max_error: float = Field(4.0, gt=0.0)
    confidence: float = Field(0.999, gt=0.0, lt=1.0)
    min_inlier_ratio: float = Field(0.1, gt=0.0, le=1.0)
    min_trials: int = Field(100, ge=1)
    max_trials: int = Field(10000, ge=1)
    min_matches: int = Field(15, ge=4)
    seed: int = 0
    match: MatchSettings = MatchSettings()


@dataclass(frozen=True, eq=False)
class Verification:
    """The verified correspondences of a pair: ``inliers`` = len(matches); ``matches`` (K, 2) int64
    rows of the two images' keypoints; ``putative`` tentative matches before RANSAC; ``model``
    the model found ("homography", "fundamental", COLMAP's configuration name for two_view, or
    "none"); ``H`` (image 1 -> image 2) / ``F`` when estimated (3, 3) float64, else None."""

    inliers: int
    matches: np.ndarray
    putative: int
    model: str
    H: np.ndarray | None = None
    F: np.ndarray | None = None


def _none(putative: int) -> Verification:
    return Verification(0, np.zeros((0, 2), dtype=np.int64), int(putative), "none")


def _ransac(settings: VerifySettings, threshold: float) -> Any:
    import pycolmap

    r = pycolmap.RANSACOptions()
    r.max_error = float(threshold)
    r.confidence = float(settings.confidence)
    r.min_inlier_ratio = float(settings.min_inlier_ratio)
    r.min_num_trials = int(settings.min_trials)
    r.max_num_trials = int(max(settings.max_trials, settings.min_trials))
    r.random_seed = int(settings.seed)
    return r


def _camera(f: LocalFeatures) -> Any:
    import pycolmap

    w, h = f.size
    return pycolmap.Camera.create_from_model_name(1, "SIMPLE_PINHOLE", 1.2 * max(w, h), w, h)


def geometric_check(f1: LocalFeatures, f2: LocalFeatures, matches: np.ndarray,
                    settings: VerifySettings | None = None) -> Verification:
    """RANSAC on given tentative ``matches`` (M, 2) of f1 x f2 rows -> :class:`Verification`."""
    import pycolmap

    settings = settings or VerifySettings()
    matches = np.asarray(matches, dtype=np.int64).reshape(-1, 2)
    m = len(matches)
    if m < max(settings.min_matches, MIN_SAMPLE[settings.model]):
        return _none(m)
    threshold = settings.max_error * float(np.sqrt(f1.scale * f2.scale))
    if settings.model == "two_view":
        opts = pycolmap.TwoViewGeometryOptions()
        opts.ransac = _ransac(settings, threshold)
        opts.min_num_inliers = int(settings.min_matches)
        geom = pycolmap.estimate_two_view_geometry(_camera(f1), f1.xy, _camera(f2), f2.xy,
                                                   matches.astype(np.uint32), opts)
        inl = np.asarray(geom.inlier_matches, dtype=np.int64).reshape(-1, 2)
        name = str(geom.config).rsplit(".", 1)[-1].lower()
        return Verification(len(inl), inl, m, name if len(inl) else "none",
                            H=np.asarray(geom.H, dtype=np.float64), F=np.asarray(geom.F, dtype=np.float64))
    p1, p2 = f1.xy[matches[:, 0]], f2.xy[matches[:, 1]]
    ransac = _ransac(settings, threshold)
    if settings.model == "homography":
        res = pycolmap.estimate_homography_matrix(p1, p2, ransac)
    else:
        res = pycolmap.estimate_fundamental_matrix(p1, p2, ransac)
    if not res:
        return _none(m)
    mask = np.asarray(res["inlier_mask"], dtype=bool)
    inl = matches[mask]
    mat = np.asarray(res["H" if settings.model == "homography" else "F"], dtype=np.float64)
    return Verification(len(inl), inl, m, settings.model,
                        H=mat if settings.model == "homography" else None,
                        F=mat if settings.model == "fundamental" else None)


def verify(f1: LocalFeatures, f2: LocalFeatures, settings: VerifySettings | None = None, *,
           device: str = "auto") -> Verification:
    """Match (:func:`cbir.local.matching.match_many`, COLMAP's rule) and verify one pair."""
    settings = settings or VerifySettings()
    matches = match_many(f1, [f2], settings.match, device=device)[0]
    return geometric_check(f1, f2, matches, settings)


def _resolve(candidates: Sequence[Any], store: "LocalFeatureStore | None") -> list[LocalFeatures]:
    out = []
    for c in candidates:
        if isinstance(c, LocalFeatures):
            out.append(c)
        elif isinstance(c, str):
            if store is None:
                raise ValueError("candidates given by key need store=")
            out.append(store.get(c))
        else:
            raise TypeError(f"a candidate must be LocalFeatures or a store key, got {type(c).__name__}")
    return out


def verify_candidates(
    query: LocalFeatures,
    candidates: Sequence[LocalFeatures | str],
    settings: VerifySettings | None = None,
    *,
    store: "LocalFeatureStore | None" = None,
    details: bool = False,
    device: str = "auto",
) -> np.ndarray | tuple[np.ndarray, list[Verification]]:
    """Inlier counts (K,) int64 of ``query`` with each candidate (features, or keys of ``store``):
    all tentative matches in one batched computation (:func:`match_many`), then RANSAC for each
    candidate with at least ``settings.min_matches`` of them. ``details``: also the
    :class:`Verification` of each (correspondences, model)."""
    settings = settings or VerifySettings()
    cands = _resolve(candidates, store)
    all_matches = match_many(query, cands, settings.match, device=device)
    results = [geometric_check(query, c, m, settings) for c, m in zip(cands, all_matches)]
    counts = np.asarray([r.inliers for r in results], dtype=np.int64)
    return (counts, results) if details else counts


def verify_pairs(
    store: "LocalFeatureStore",
    pairs: Sequence[Sequence[str]] | np.ndarray,
    settings: VerifySettings | None = None,
    *,
    progress: Callable[[int], Any] | None = None,
    device: str = "auto",
) -> np.ndarray:
    """Inlier counts (P,) int64 of ``pairs`` (P, 2) of store keys. Pairs sharing their first key are
    matched together (one batched computation per first key); ``progress(n)`` after each group."""
    settings = settings or VerifySettings()
    pairs = [(str(a), str(b)) for a, b in pairs]
    groups: dict[str, list[int]] = defaultdict(list)
    for p, (a, _) in enumerate(pairs):
        groups[a].append(p)
    out = np.zeros(len(pairs), dtype=np.int64)
    for a, idx in groups.items():
        counts = verify_candidates(store.get(a), [pairs[p][1] for p in idx], settings, store=store, device=device)
        out[idx] = counts
        if progress is not None:
            progress(len(idx))
    return out
