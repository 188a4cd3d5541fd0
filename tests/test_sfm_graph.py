"""The verified-pair graph and its clusters, weak bridges cut (cbir.sfm.graph)."""

from __future__ import annotations

import numpy as np

from cbir.sfm.graph import cluster_graph, components


def _two_triangles(bridge_inliers_count: int, extra: list[tuple[int, int, int]] = ()):
    # triangle {0, 1, 2} and triangle {3, 4, 5}, joined by 2-3; photo 6 hangs on 5 by a weak edge;
    # 7-8 is an unverified pair; 9 is in no pair
    edges = [(0, 1, 80), (1, 2, 60), (0, 2, 40), (3, 4, 90), (4, 5, 50), (3, 5, 70),
             (2, 3, bridge_inliers_count), (5, 6, 16), (7, 8, 5), *extra]
    pairs = np.array([(a, b) for a, b, _ in edges])
    inliers = np.array([n for _, _, n in edges])
    return pairs, inliers


def test_components_numbered_by_smallest_photo_and_unpaired_photos_get_minus_one():
    labels = components(7, np.array([[5, 6], [1, 2], [2, 4]]))
    assert labels.tolist() == [-1, 0, 0, -1, 0, 1, 1]


def test_a_weak_single_edge_between_two_groups_is_cut():
    pairs, inliers = _two_triangles(20)
    labels, cut = cluster_graph(10, pairs, inliers, min_inliers=15, bridge_inliers=30)
    assert cut.tolist() == [6]  # the 2-3 bridge (20 < 30 inliers), both sides >= 2 photos
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1, -1, -1, -1]  # 6 stays with its only partner


def test_a_strong_bridge_or_a_second_link_joins_the_groups():
    pairs, inliers = _two_triangles(45)  # one strong edge
    labels, cut = cluster_graph(10, pairs, inliers, min_inliers=15, bridge_inliers=30)
    assert len(cut) == 0 and len(set(labels[:7])) == 1
    pairs, inliers = _two_triangles(20, extra=[(1, 4, 18)])  # two weak edges: a cycle, no bridge
    labels, cut = cluster_graph(10, pairs, inliers, min_inliers=15, bridge_inliers=30)
    assert len(cut) == 0 and len(set(labels[:7])) == 1


def test_no_cut_without_the_rule_and_unverified_edges_ignored():
    pairs, inliers = _two_triangles(20)
    labels, cut = cluster_graph(10, pairs, inliers, min_inliers=15, bridge_inliers=0)
    assert len(cut) == 0 and labels.tolist() == [0, 0, 0, 0, 0, 0, 0, -1, -1, -1]
    labels, _ = cluster_graph(10, pairs, inliers, min_inliers=100, bridge_inliers=30)
    assert (labels == -1).all()


def test_a_chain_of_weak_bridges_between_big_groups_leaves_the_middle_photo_alone():
    # clique {0,1,2} -w- 3 -w- clique {4,5,6}: both weak edges join groups of >= 2 photos
    clique = [(0, 1, 50), (1, 2, 50), (0, 2, 50), (4, 5, 50), (5, 6, 50), (4, 6, 50)]
    edges = clique + [(2, 3, 20), (3, 4, 20)]
    pairs = np.array([(a, b) for a, b, _ in edges])
    labels, cut = cluster_graph(7, pairs, np.array([n for *_, n in edges]), 15, 30)
    assert sorted(cut.tolist()) == [6, 7]
    assert labels.tolist() == [0, 0, 0, -1, 1, 1, 1]
