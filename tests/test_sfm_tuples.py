"""Mined tuples in the retrieval-SfM format with their evidence (cbir.sfm.tuples), read back by training."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.datasets.revisitop import load_gnd, load_plain_pickle
from cbir.sfm.tuples import (build_tuples, positive_pairs, split_clusters, validation_gnd, write_pickle)
from cbir.training.data import load_sfm

# photos 0-3 cluster 0, 4-5 cluster 1, 6-8 cluster 2, 9 in no cluster
CLUSTERS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, -1])
PAIRS = np.array([[0, 1], [1, 2], [2, 3], [0, 3], [4, 5], [6, 7], [7, 8], [3, 4], [5, 9], [1, 3]])
INLIERS = np.array([40, 25, 15, 9, 60, 33, 18, 16, 5, 14])
CUT = np.array([7])  # 3-4 was a weak bridge


def test_positive_pairs_hand_checked():
    shared = np.array([[0, 2, 30], [0, 1, 55], [1, 3, 4], [6, 8, 20], [4, 5, 12]])
    pos = positive_pairs(CLUSTERS, PAIRS, INLIERS, 15, CUT, shared, min_shared_points=15)
    assert pos == {
        (0, 1): (40, 55),   # verified, and 55 shared points
        (0, 2): (0, 30),    # never a candidate pair: a positive from the 3D model alone
        (1, 2): (25, 0),
        (2, 3): (15, 0),    # exactly min_inliers
        (4, 5): (60, 12),   # verified; its 12 shared points are recorded though below 15
        (6, 7): (33, 0),
        (6, 8): (0, 20),
        (7, 8): (18, 0),
    }  # not (0, 3): 9 inliers; not (3, 4): cut; not (1, 3): 14 inliers and 4 points; not (5, 9): 9 unclustered


def test_split_holds_out_whole_clusters_deterministically():
    train, val = split_clusters(range(10), 0.2, seed=0)
    assert len(val) == 2 and sorted(train + val) == list(range(10)) and not set(train) & set(val)
    assert split_clusters(range(10), 0.2, seed=0) == (train, val)
    assert split_clusters(range(3), 0.5, seed=0) == ([0, 1, 2], [])  # too few clusters: no val
    assert len(split_clusters(range(4), 0.9, seed=1)[0]) == 2  # 2 always left to train on
    assert split_clusters(range(8), 0.0, seed=0)[1] == []


def test_tuple_file_round_trip_through_training_loader(tmp_path):
    names = [f"sub/p{i}.jpg" for i in range(10)]
    shared = np.array([[0, 2, 30], [6, 8, 20]])
    pos = positive_pairs(CLUSTERS, PAIRS, INLIERS, 15, CUT, shared, 15)
    doc = build_tuples(names, CLUSTERS, pos, val_fraction=0.0, seed=0)
    assert doc["val"] == {k: [] for k in doc["val"]}
    write_pickle(tmp_path / "t.pkl", doc)
    raw = load_plain_pickle(tmp_path / "t.pkl")  # plain data only
    tr = raw["train"]
    assert tr["cids"] == names[:9] and tr["cluster"] == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert len(tr["qidxs"]) == 2 * len(pos) and len(tr["pinliers"]) == len(tr["p3d"]) == len(tr["qidxs"])
    for q, p, n, s in zip(tr["qidxs"], tr["pidxs"], tr["pinliers"], tr["p3d"]):
        assert pos[(min(q, p), max(q, p))] == (n, s)  # every verified partner listed, both ways
    data = load_sfm(tmp_path / "t.pkl", tmp_path, layout="flat")
    assert data.paths[0] == tmp_path / "sub" / "p0.jpg"
    q0 = int(np.flatnonzero(data.queries == 0)[0])
    assert data.positives[q0].tolist() == [1, 2] and data.evidence[q0].tolist() == [[40, 0], [0, 30]]


def test_val_split_and_its_ground_truth(tmp_path):
    clusters = np.repeat(np.arange(6), 3)
    pairs = np.array([[3 * c, 3 * c + 1] for c in range(6)] + [[3 * c + 1, 3 * c + 2] for c in range(6)])
    pos = positive_pairs(clusters, pairs, np.full(len(pairs), 30), 15, np.zeros(0, int), np.zeros((0, 3)), 15)
    doc = build_tuples([f"{i}.jpg" for i in range(18)], clusters, pos, val_fraction=0.3, seed=4)
    tr, va = doc["train"], doc["val"]
    assert len(set(va["cluster"])) == 2 and len(set(tr["cluster"])) == 4
    assert not set(tr["cids"]) & set(va["cids"]) and len(tr["cids"]) + len(va["cids"]) == 18
    gnd = validation_gnd(va)
    write_pickle(tmp_path / "gnd.pkl", gnd)
    g = load_gnd(tmp_path / "gnd.pkl")
    assert g["imlist"] == va["cids"] == g["qimlist"]
    # the middle photo of a chain a-b-c has both others as easy positives; an end photo the middle
    # one, and the other end (same cluster, not its partner) as a hard positive; itself junk
    first = [i for i, c in enumerate(va["cluster"]) if c == va["cluster"][0]]
    assert g["gnd"][first[1]]["easy"] == [first[0], first[2]] and g["gnd"][first[1]]["hard"] == []
    assert g["gnd"][first[0]]["easy"] == [first[1]] and g["gnd"][first[0]]["hard"] == [first[2]]
    assert g["gnd"][first[0]]["junk"] == [first[0]]


def test_crafted_tuple_file_runs_no_code_and_is_refused_in_one_line(tmp_path):
    import pickle
    from pathlib import Path

    from cbir.fileio import FormatError

    marker = tmp_path / "PWNED"

    class Touch:
        def __reduce__(self):
            return (Path.touch, (marker,))

    split = {"cids": ["a", "b"], "cluster": [0, 0], "qidxs": [0], "pidxs": [1], "pinliers": [Touch()], "p3d": [0]}
    (tmp_path / "t.pkl").write_bytes(pickle.dumps({"train": split}))
    with pytest.raises(FormatError, match="refusing to load pathlib") as err:
        load_sfm(tmp_path / "t.pkl", tmp_path)
    assert "\n" not in str(err.value) and not marker.exists()
