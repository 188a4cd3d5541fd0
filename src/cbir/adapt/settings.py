"""What decides the recipe ``cbir adapt`` writes: :class:`AdaptSettings`, a strict schema.

Defaults were chosen on ONE set, holidays-805 (its ground truth read by the measurement script
``benchmarks/adapt.py choose``, never by adapt), and are reported on another (rparis6k-250), see
docs/adapt.md. Mining: :class:`cbir.sfm.settings.PairSettings` as ``cbir mine`` (Lite0 + GeM kNN,
k = 10, RootSIFT 640 px / 1024 features, two-view RANSAC, 15 inliers, weak bridges cut below 30).
Learned: Lw at 512 dimensions, shrinkage 0.5, positives = verified partners, the full re-ranking
search of :class:`cbir.rerank.tune.Grid` scored with every photo of a query's cluster as its
positives (``search_positives="cluster"``: on holidays-805 88.30 against 88.52 with verified
partners only, tied; the tie goes to the pseudo ground truth that does not count same-place photos
that failed to verify as negatives, which penalises every re-ranking that brings them in). The rule on holidays-805 (mAP of the recipe): candidates
within 0.5 points of the best are tied, and among tied ones the existing choice wins (the issue
prototype's 512-d Lw, ``cbir tune``'s full search).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..schema import MAX_DIM, Bool, Float, Int, Schema
from ..sfm.settings import PairSettings

__all__ = ["AdaptSettings"]


class AdaptSettings(Schema):
    """``cbir adapt`` (:func:`cbir.adapt.adapt`).

    ``pairs``: the mining (global kNN, local features, verification, clusters);
    ``positives``: what counts as a match of a photo, for the learned whitening and the pseudo
    ground truth that judges it: ``"cluster"`` every other photo of its cluster of verified pairs,
    ``"verified"`` only its verified partners; ``lw_dim`` / ``lw_shrinkage``: the learned
    whitening (:func:`cbir.whitening.learn_lw`; dim capped at the descriptor size);
    ``search_positives``: the positives of the pseudo ground truth that scores the re-ranking
    search (``"same"``: as ``positives``);
    ``search``: the re-ranking search, ``"full"`` (:class:`cbir.rerank.tune.Grid`) or ``"fast"``
    (a few candidates per step); ``verify``: also try spatial verification in the search (off by
    default: the pseudo ground truth *is* verification, so it favours it whatever it is worth);
    ``min_pairs``: fewer verified pairs than this and adapt refuses (nothing to learn from).
    """

    pairs: PairSettings = Field(default_factory=PairSettings)
    positives: Literal["cluster", "verified"] = "verified"
    search_positives: Literal["cluster", "verified", "same"] = "cluster"
    lw_dim: Int(ge=1, le=MAX_DIM) | None = 512
    lw_shrinkage: Float(ge=0.0, le=1.0) = 0.5
    search: Literal["full", "fast"] = "full"
    verify: Bool = False
    min_pairs: Int(ge=1, le=10**9) = 10
