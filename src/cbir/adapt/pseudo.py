"""Pseudo ground truth from verified pairs: every photo with a verified partner is a query, its
matches are its positives; and the held-out split that keeps what is learned and what judges it apart.

Given N photos, the candidate pairs (P, 2) with their RANSAC inlier counts, the verified pairs are
those with n >= ``min_inliers`` that were not cut as weak bridges (:func:`cbir.sfm.graph.cluster_graph`).
Positives of photo i (:func:`positive_lists`):

- ``"verified"``: its verified partners, {j : (i, j) verified};
- ``"cluster"``: the other photos of its cluster (connected component of the verified graph, weak
  bridges cut): photos joined to i by a chain of verified pairs, as a landmark's photos are.

The pseudo ground truth (:func:`pseudo_gnd`) is a revisitop one: query i (a photo with >= 1
positive) has ``easy`` = its positives, ``hard`` = [], ``junk`` = [i] (the photo itself, which is
in the database too). Its Medium mAP is the score (Hard has no positives and is NaN).

Held-out split (:func:`cluster_folds`): the clusters are dealt into 2 folds, largest first,
alternately (fold sizes in photos stay close); a pair never crosses folds (both photos of a
verified pair are in one cluster). Whatever is learned from fold A's pairs (the whitening) is
judged on fold B's queries and the other way round, so no score is measured on the pairs it was
learned from (Radenović et al., TPAMI'18, learn Lw from mined pairs and test elsewhere).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

__all__ = ["verified_edges", "positive_lists", "pseudo_gnd", "cluster_folds", "matching_pairs"]


def verified_edges(pairs: np.ndarray, inliers: np.ndarray, min_inliers: int,
                   cut: np.ndarray | Sequence[int] = ()) -> np.ndarray:
    """The verified pairs (E, 2) int64: rows of ``pairs`` with inliers >= ``min_inliers``, the
    indices ``cut`` (weak bridges, indices into ``pairs``) left out."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    keep = np.asarray(inliers) >= int(min_inliers)
    if keep.shape != (len(pairs),):
        raise ValueError(f"{len(pairs)} pairs but {keep.shape} inlier counts")
    cut = np.asarray(cut, dtype=np.int64)
    keep[cut] = False
    return pairs[keep]


def positive_lists(n: int, edges: np.ndarray, clusters: np.ndarray,
                   rule: Literal["cluster", "verified"] = "cluster") -> list[list[int]]:
    """Positives of each of the n photos (sorted, never the photo itself), by ``rule`` (module doc).

    ``edges`` (E, 2) verified pairs; ``clusters`` (n,) cluster of each photo, -1 for none."""
    out: list[set[int]] = [set() for _ in range(n)]
    if rule == "verified":
        for a, b in np.asarray(edges, dtype=np.int64).reshape(-1, 2).tolist():
            if a != b:
                out[a].add(b)
                out[b].add(a)
    elif rule == "cluster":
        clusters = np.asarray(clusters, dtype=np.int64)
        if clusters.shape != (n,):
            raise ValueError(f"clusters must be one label per photo ({n}), got shape {clusters.shape}")
        for c in np.unique(clusters[clusters >= 0]):
            members = np.flatnonzero(clusters == c).tolist()
            for i in members:
                out[i].update(j for j in members if j != i)
    else:
        raise ValueError(f"positives rule must be 'cluster' or 'verified', got {rule!r}")
    return [sorted(s) for s in out]


def pseudo_gnd(positives: Sequence[Sequence[int]], photos: Sequence[int] | None = None
               ) -> tuple[list[int], list[dict]]:
    """(query photos, revisitop ground truth per query): every photo (of ``photos``, default all)
    with >= 1 positive is a query; easy = its positives, hard = [], junk = [itself]."""
    use = range(len(positives)) if photos is None else photos
    queries = [int(i) for i in use if len(positives[int(i)])]
    gnd = [{"easy": list(positives[i]), "hard": [], "junk": [i], "bbx": None} for i in queries]
    return queries, gnd


def cluster_folds(clusters: np.ndarray, k: int = 2) -> np.ndarray:
    """Fold (0..k-1) of each photo, -1 for photos in no cluster: clusters by decreasing size (ties:
    smaller id first) dealt to the fold with fewest photos so far (ties: the lower fold)."""
    clusters = np.asarray(clusters, dtype=np.int64)
    fold = np.full(len(clusters), -1, dtype=np.int64)
    ids, sizes = np.unique(clusters[clusters >= 0], return_counts=True)
    load = [0] * k
    for c, s in sorted(zip(ids.tolist(), sizes.tolist()), key=lambda t: (-t[1], t[0])):
        f = min(range(k), key=lambda j: (load[j], j))
        fold[clusters == c] = f
        load[f] += s
    return fold


def matching_pairs(positives: Sequence[Sequence[int]], photos: Sequence[int] | None = None) -> np.ndarray:
    """Every unordered pair (i, j), i < j, with j a positive of i, for i in ``photos`` (all if None)
    and j in ``photos`` too -> (M, 2) int64, sorted: the matching pairs Lw is learned from."""
    use = set(range(len(positives))) if photos is None else {int(i) for i in photos}
    found = {(min(i, j), max(i, j)) for i in use for j in positives[i] if j in use and j != i}
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)
