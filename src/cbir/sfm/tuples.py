"""Training tuples from mined clusters, in the retrieval-SfM-120k format with the evidence of each pair.

The file (a plain pickle: dicts, lists, strings, ints; read by
:func:`cbir.datasets.revisitop.load_plain_pickle`, so by ``cbir train data.kind=sfm``)::

    {"format": "cbir-mined-tuples", "format_version": 1,
     "train": {"cids": [...], "cluster": [...], "qidxs": [...], "pidxs": [...], "pinliers": [...], "p3d": [...]},
     "val":   {... the same keys ...}}

``cids``: photo names relative to the mined folder, extension included (``data.layout: flat``,
``data.ext: ""``); ``cluster``: the mined cluster of each (ids shared by both splits); every
(``qidxs[t]``, ``pidxs[t]``) is a query and one of its positives (indices into that split's
``cids``), both directions of every positive pair, sorted; ``pinliers[t]``: the pair's RANSAC inlier
count (0 when it was not a verified pair); ``p3d[t]``: the 3D points the two photos share in one
model (0 when none).

A positive pair is two photos of one cluster that were verified (n >= min_inliers, not a cut
bridge), or that share >= ``min_shared_points`` 3D points (SfM links photos through others: pairs
the global descriptor did not propose, the hard positives the method is after). Photos in no
cluster are left out: a photo that verified with nothing may still show a mined landmark, and
negatives must not be such photos. The ``val`` split holds whole clusters (``val_fraction`` of them,
at least 2 and leaving 2 for training; none with fewer than 4 clusters).

:func:`validation_gnd` writes the ``val`` split as a revisitop ground truth (every val photo a
query; easy: its listed partners, hard: the rest of its cluster, junk: itself; Medium = same
cluster), for ``validation: {gnd: DIR/val_gnd.pkl, images: FOLDER, ext: ""}``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import atomic_write_bytes

__all__ = ["TUPLES_FORMAT", "TUPLES_VERSION", "positive_pairs", "split_clusters", "build_tuples", "write_pickle",
           "validation_gnd"]

TUPLES_FORMAT = "cbir-mined-tuples"
TUPLES_VERSION = 1
SPLIT_KEYS = ("cids", "cluster", "qidxs", "pidxs", "pinliers", "p3d")


def positive_pairs(clusters: np.ndarray, pairs: np.ndarray, inliers: np.ndarray, min_inliers: int, cut: np.ndarray,
                   shared: np.ndarray, min_shared_points: int) -> dict[tuple[int, int], tuple[int, int]]:
    """{(i, j): (inliers, shared points)}, i < j, the positive pairs of the module docstring.

    clusters (N,) (-1: none); pairs (P, 2), inliers (P,), cut (indices of pairs); shared (S, 3) rows
    (i, j, s_ij)."""
    clusters = np.asarray(clusters, dtype=np.int64)
    evidence: dict[tuple[int, int], list[int]] = {}
    cut_set = {int(c) for c in np.asarray(cut).reshape(-1)}
    for p in np.flatnonzero(np.asarray(inliers) >= min_inliers):
        if int(p) in cut_set:
            continue
        a, b = sorted((int(pairs[p, 0]), int(pairs[p, 1])))
        if clusters[a] < 0 or clusters[a] != clusters[b]:
            continue
        evidence[(a, b)] = [int(inliers[p]), 0]
    known = {(min(int(a), int(b)), max(int(a), int(b))): int(inliers[p])
             for p, (a, b) in enumerate(np.asarray(pairs).reshape(-1, 2))}
    for a, b, s in np.asarray(shared, dtype=np.int64).reshape(-1, 3):
        a, b = sorted((int(a), int(b)))
        if (a, b) in evidence:
            evidence[(a, b)][1] = int(s)
        elif s >= min_shared_points and clusters[a] >= 0 and clusters[a] == clusters[b]:
            n = known.get((a, b), 0)
            evidence[(a, b)] = [n if n >= min_inliers else 0, int(s)]
    return {k: (v[0], v[1]) for k, v in sorted(evidence.items())}


def split_clusters(cluster_ids: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train clusters, val clusters): ``fraction`` of the clusters held out (rounded, at least 2,
    at least 2 left to train on; none with fewer than 4 clusters or fraction 0), drawn with ``seed``."""
    ids = sorted(int(c) for c in set(cluster_ids))
    n_val = 0
    if fraction > 0 and len(ids) >= 4:
        n_val = min(max(2, int(round(fraction * len(ids)))), len(ids) - 2)
    rng = np.random.default_rng(seed)
    val = sorted(int(c) for c in rng.choice(ids, size=n_val, replace=False)) if n_val else []
    vs = set(val)
    return [c for c in ids if c not in vs], val


def _split(keys: Sequence[str], clusters: np.ndarray, members: list[int],
           positives: dict[tuple[int, int], tuple[int, int]]) -> dict[str, list]:
    members = sorted(members)
    local = {g: i for i, g in enumerate(members)}
    rows = []
    for (a, b), (n, s) in positives.items():
        if a in local and b in local:
            rows.append((local[a], local[b], n, s))
            rows.append((local[b], local[a], n, s))
    rows.sort()
    return {"cids": [str(keys[g]) for g in members], "cluster": [int(clusters[g]) for g in members],
            "qidxs": [r[0] for r in rows], "pidxs": [r[1] for r in rows],
            "pinliers": [int(r[2]) for r in rows], "p3d": [int(r[3]) for r in rows]}


def build_tuples(keys: Sequence[str], clusters: np.ndarray, positives: dict[tuple[int, int], tuple[int, int]],
                 val_fraction: float, seed: int) -> dict[str, Any]:
    """The tuple document (module docstring) of photos ``keys`` with ``clusters`` and ``positives``
    (:func:`positive_pairs`); clusters without a positive pair are left out."""
    clusters = np.asarray(clusters, dtype=np.int64)
    in_pair = sorted({int(clusters[a]) for a, _ in positives})
    train_c, val_c = split_clusters(in_pair, val_fraction, seed)
    out: dict[str, Any] = {"format": TUPLES_FORMAT, "format_version": TUPLES_VERSION}
    for name, chosen in (("train", set(train_c)), ("val", set(val_c))):
        members = [int(i) for i in np.flatnonzero(np.isin(clusters, list(chosen)))] if chosen else []
        out[name] = _split(keys, clusters, members, positives)
    return out


def validation_gnd(split: dict[str, list]) -> dict[str, Any]:
    """A revisitop ground truth of a split (every photo a query against the split's photos): ``easy``
    its listed partners (verified, or sharing 3D points), ``hard`` the other photos of its cluster
    (joined to it only through others), ``junk`` itself. Medium (easy + hard) is "same cluster"."""
    cids, clusters = list(split["cids"]), np.asarray(split["cluster"], dtype=np.int64)
    pos: dict[int, set[int]] = {}
    for q, p in zip(split["qidxs"], split["pidxs"]):
        pos.setdefault(int(q), set()).add(int(p))
    gnd = []
    for i in range(len(cids)):
        easy = sorted(pos.get(i, set()))
        hard = sorted(set(np.flatnonzero(clusters == clusters[i]).tolist()) - set(easy) - {i})
        gnd.append({"easy": easy, "hard": hard, "junk": [i], "bbx": None})
    return {"imlist": cids, "qimlist": list(cids), "gnd": gnd}


def write_pickle(path: str | os.PathLike[str], doc: Any) -> None:
    """Atomic plain pickle (protocol 4) of plain data (dicts, lists, strings, ints)."""
    atomic_write_bytes(Path(path), pickle.dumps(doc, protocol=4))
