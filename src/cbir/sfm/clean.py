"""Cleaning class-labelled photos by spatial verification against their class-mates.

Labels of collections such as Google Landmarks v2 are noisy: a class holds photos of its landmark
and photos of anything else taken nearby (interiors, food, people). The method cleans them with
classical vision: a photo is kept when it verifies geometrically with its class (Radenović et al.,
TPAMI'18, after Gordo et al.'s cleaning of the Landmarks set: only images that match others of
their class by spatial verification are kept). Here, with bounded work per photo:

1. for every photo i of a class of >= 2 photos, its ``candidates`` nearest class-mates by global
   descriptor (x_i . x_j, largest first) are its candidate partners (pairs deduplicated);
2. every candidate pair is matched and verified (:func:`cbir.local.verify.verify_pairs`, SIFT of
   each photo once in a :class:`cbir.local.store.LocalFeatureStore`); v_i = the number of
   class-mates that verify with i (n >= ``min_inliers``), counted over every checked pair that
   holds i (also those proposed by the other photo);
3. i is kept iff v_i >= ``min_verified``, in classes where verification has a say.

Never silently empties a class, nor guts one where verification simply does not work: when fewer
than ``min_class_fraction`` (0.5) of a class's photos verify with a class-mate (none at all
included), the class is *unverified*: ``on_unverified="keep"`` keeps it whole and names it in the
report (no evidence either way: views of one landmark that differ much rarely verify; measured on 6
Paris photos a landmark, 1 of 45 genuine pairs verified), ``"drop"`` drops it whole and names it.
Photos of single-photo classes have nothing to be checked against: kept.
Work: at most N x ``candidates`` pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from pydantic import Field

from ..local.features import LocalFeatureSettings
from ..local.verify import VerifySettings
from ..schema import Float, Int, Schema
from .settings import MINING_LOCAL

__all__ = ["VerifyCleanSettings", "CleanReport", "candidate_classmates", "clean_by_verification"]


class VerifyCleanSettings(Schema):
    """See the module docstring."""

    min_inliers: Int(ge=1, le=100000) = 15
    min_verified: Int(ge=1, le=1000) = 1
    candidates: Int(ge=1, le=1000) = 5
    min_class_fraction: Float(ge=0.0, le=1.0) = 0.5
    on_unverified: Literal["keep", "drop"] = "keep"
    local: LocalFeatureSettings = Field(default_factory=lambda: MINING_LOCAL)
    verify: VerifySettings = Field(default_factory=VerifySettings)


@dataclass
class CleanReport:
    """``keep`` (N,) bool; ``verified_with`` (N,) class-mates each photo verified with (-1: not
    checked, single-photo class); ``dropped`` {class: [paths]}; ``unverified_classes`` {class:
    (photos verified, photos)} of the classes where too few verified (kept whole with
    on_unverified="keep", else dropped whole); ``pairs`` checked, ``verified_pairs``; ``failed``
    {path: reason} photos whose features could not be extracted."""

    keep: np.ndarray
    verified_with: np.ndarray
    dropped: dict[str, list[str]] = field(default_factory=dict)
    unverified_classes: dict[str, tuple[int, int]] = field(default_factory=dict)
    on_unverified: str = "keep"
    pairs: int = 0
    verified_pairs: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """What was dropped, in words (one line per class, then the whole-class cases)."""
        n = len(self.keep)
        out = [f"cleaning by verification: kept {int(self.keep.sum())} of {n} photos "
               f"({self.verified_pairs} of {self.pairs} class-mate pairs verified)"]
        for cls, files in sorted(self.dropped.items()):
            out.append(f"  class {cls}: dropped {len(files)}: {', '.join(Path(f).name for f in files)}")
        for cls, (got, size) in self.unverified_classes.items():
            what = "kept whole (on_unverified=keep)" if self.on_unverified == "keep" else \
                "dropped whole (on_unverified=drop)"
            out.append(f"  class {cls}: {got} of {size} photos verified with a class-mate, too few to judge; {what}")
        return out


def candidate_classmates(vectors: np.ndarray, labels: np.ndarray, candidates: int) -> np.ndarray:
    """(P, 2) int64 pairs i < j, sorted: each photo with its ``candidates`` most similar class-mates
    (x_i . x_j over j != i of its class, ties to the lower index), deduplicated."""
    from ..rerank.knn import topk

    x = np.asarray(vectors, dtype=np.float32)
    y = np.asarray(labels)
    found: set[tuple[int, int]] = set()
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < 2:
            continue
        s = x[members] @ x[members].T
        np.fill_diagonal(s, -np.inf)
        _, idx = topk(s, min(candidates, len(members) - 1))
        for r, row in enumerate(idx):
            for j in row:
                a, b = int(members[r]), int(members[j])
                found.add((min(a, b), max(a, b)))
    return np.asarray(sorted(found), dtype=np.int64).reshape(-1, 2)


def clean_by_verification(
    paths: Sequence[str | os.PathLike[str]],
    labels: Sequence[Any],
    vectors: np.ndarray,
    store: str | os.PathLike[str],
    settings: VerifyCleanSettings | None = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    workers: int = 1,
    device: str = "auto",
) -> CleanReport:
    """Clean ``paths`` with class ``labels`` (module docstring); ``vectors`` (N, D) their global
    descriptors (L2-normalised), ``store`` the folder of their local features (created, or reused:
    extraction resumes). ``progress(stage, done, total)``: stages "features", "verify"."""
    from ..local.store import LocalFeatureStore, extract_to_store
    from ..local.verify import verify_pairs

    settings = settings or VerifyCleanSettings()
    paths = [Path(p) for p in paths]
    y = np.asarray([str(v) for v in labels])
    n = len(paths)
    if len(y) != n or np.asarray(vectors).shape[0] != n:
        raise ValueError(f"{n} photos, {len(y)} labels and {np.asarray(vectors).shape[0]} vectors must match")
    pairs = candidate_classmates(vectors, y, settings.candidates)
    need = sorted(set(pairs.ravel().tolist()))
    keys = [str(p.resolve()) for p in paths]
    st = LocalFeatureStore(store, settings.local)
    extract_to_store([paths[i] for i in need], [keys[i] for i in need], None, st, workers=workers, device="cpu",
                     progress=None if progress is None else (lambda k: progress("features", k, len(need))))
    ok = np.asarray([k in st for k in keys], dtype=bool)
    usable = np.asarray([ok[a] and ok[b] for a, b in pairs], dtype=bool) if len(pairs) else np.zeros(0, bool)
    inliers = np.zeros(len(pairs), dtype=np.int64)
    if usable.any():
        inliers[usable] = verify_pairs(st, [(keys[a], keys[b]) for a, b in pairs[usable]], settings.verify,
                                       device=device,
                                       progress=None if progress is None else
                                       (lambda k: progress("verify", k, int(usable.sum()))))
    good = pairs[inliers >= settings.min_inliers]
    verified_with = np.zeros(n, dtype=np.int64)
    np.add.at(verified_with, good[:, 0], 1)
    np.add.at(verified_with, good[:, 1], 1)
    keep = verified_with >= settings.min_verified
    unverified: dict[str, tuple[int, int]] = {}
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < 2:
            keep[members] = True
            verified_with[members] = -1
            continue
        got = int(keep[members].sum())
        if got == 0 or got < settings.min_class_fraction * len(members):
            unverified[str(c)] = (got, len(members))
            keep[members] = settings.on_unverified == "keep"
    dropped: dict[str, list[str]] = {}
    for i in np.flatnonzero(~keep):
        if str(y[i]) in unverified:
            continue
        dropped.setdefault(str(y[i]), []).append(str(paths[i]))
    failed = {str(paths[i]): st.failed.get(keys[i], "no features") for i in need if not ok[i]}
    return CleanReport(keep=keep, verified_with=verified_with, dropped=dropped, unverified_classes=unverified,
                       on_unverified=settings.on_unverified, pairs=int(len(pairs)), verified_pairs=int(len(good)),
                       failed=failed)
