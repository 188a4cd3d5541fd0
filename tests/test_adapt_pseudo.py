"""Pseudo ground truth from verified pairs, by hand on a tiny graph (cbir.adapt.pseudo)."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.adapt.pseudo import cluster_folds, matching_pairs, positive_lists, pseudo_gnd, verified_edges

# 7 photos. Candidate pairs and inliers: 0-1 (40), 1-2 (20), 0-2 (5: not verified), 3-4 (50),
# 4-5 (16, cut as a weak bridge), 2-6 (14: not verified). Photo 6 is in no verified pair.
PAIRS = np.array([[0, 1], [1, 2], [0, 2], [3, 4], [4, 5], [2, 6]])
INLIERS = np.array([40, 20, 5, 50, 16, 14])
CUT = np.array([4])
# clusters as cluster_graph gives them with that cut: {0, 1, 2}, {3, 4}, {5} alone has no edge left
CLUSTERS = np.array([0, 0, 0, 1, 1, -1, -1])


def test_verified_edges_keep_threshold_and_drop_cut_bridges():
    e = verified_edges(PAIRS, INLIERS, 15, CUT)
    assert e.tolist() == [[0, 1], [1, 2], [3, 4]]
    assert verified_edges(PAIRS, INLIERS, 15).tolist() == [[0, 1], [1, 2], [3, 4], [4, 5]]
    assert verified_edges(PAIRS, INLIERS, 41).tolist() == [[3, 4]]
    with pytest.raises(ValueError, match="inlier counts"):
        verified_edges(PAIRS, INLIERS[:3], 15)


def test_positive_lists_by_cluster_and_by_verified_partner():
    e = verified_edges(PAIRS, INLIERS, 15, CUT)
    by_cluster = positive_lists(7, e, CLUSTERS, "cluster")
    # 0 and 2 are not a verified pair (5 inliers) but are joined through 1: positives by cluster
    assert by_cluster == [[1, 2], [0, 2], [0, 1], [4], [3], [], []]
    by_pair = positive_lists(7, e, CLUSTERS, "verified")
    assert by_pair == [[1], [0, 2], [1], [4], [3], [], []]
    with pytest.raises(ValueError, match="positives rule"):
        positive_lists(7, e, CLUSTERS, "labels")  # type: ignore[arg-type]


def test_pseudo_gnd_queries_are_photos_with_positives_and_junk_themselves():
    pos = positive_lists(7, verified_edges(PAIRS, INLIERS, 15, CUT), CLUSTERS, "cluster")
    queries, gnd = pseudo_gnd(pos)
    assert queries == [0, 1, 2, 3, 4]
    assert gnd[0] == {"easy": [1, 2], "hard": [], "junk": [0], "bbx": None}
    assert gnd[4] == {"easy": [3], "hard": [], "junk": [4], "bbx": None}
    q2, g2 = pseudo_gnd(pos, [3, 4, 5, 6])
    assert q2 == [3, 4] and [g["easy"] for g in g2] == [[4], [3]]


def test_pseudo_gnd_scores_as_revisitop_medium():
    """A ranking that puts each query's positives first scores 100, the reverse ranking less."""
    from cbir.datasets.base import RetrievalDataset

    pos = positive_lists(7, verified_edges(PAIRS, INLIERS, 15, CUT), CLUSTERS, "cluster")
    queries, gnd = pseudo_gnd(pos)
    ids = [f"p{i}" for i in range(7)]
    ds = RetrievalDataset("t", "revisitop", ids, [None] * 7, [ids[i] for i in queries], [None] * len(queries),
                          [None] * len(queries), gnd)
    perfect = np.zeros((len(queries), 7))
    for r, g in enumerate(gnd):
        perfect[r, g["easy"]] = 1.0
    assert ds.evaluate(perfect)["mAP"]["medium"] == pytest.approx(100.0)
    # query 3 ranks 5, 6, 0, 1, 2, then 4: its one positive (4) is 5th after the junk self -> AP 1/5
    worst = -perfect
    worst[3] = [0.5, 0.4, 0.3, 1.0, -1.0, 0.9, 0.8]
    ap = ds.evaluate(worst)["mAP"]["medium"]
    assert ap < 50.0


def test_cluster_folds_never_split_a_cluster_and_balance_photos():
    clusters = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, -1, 3])
    fold = cluster_folds(clusters, 2)
    # sizes 4 (c0), 3 (c2), 2 (c1), 1 (c3): c0 -> fold 0; c2 -> fold 1; c1 -> fold 1 (3 < 4); c3 -> fold 0 (4 < 5)
    assert fold.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, -1, 0]
    for c in range(4):
        assert len(set(fold[clusters == c].tolist())) == 1


def test_matching_pairs_within_the_given_photos_only():
    pos = positive_lists(7, verified_edges(PAIRS, INLIERS, 15, CUT), CLUSTERS, "cluster")
    assert matching_pairs(pos).tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]
    assert matching_pairs(pos, [0, 1, 3]).tolist() == [[0, 1]]
    assert matching_pairs(pos, [5, 6]).shape == (0, 2)
