"""Diverse hard-negative mining, hard positives and class cleaning."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbir.training.mining import (
    class_consistency_mask,
    hardest_positive,
    leave_one_out_class_similarity,
    mine_diverse_negatives,
)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_diverse_negatives_by_hand():
    q = np.array([[1.0, 0.0]])
    pool = np.array([[0.99, 0.141], [0.98, 0.199], [0.9, 0.436], [0.0, 1.0], [0.95, 0.312]])
    clusters = np.array([7, 1, 1, 2, 3])
    # by similarity: 0 (cluster 7 = query's), 1 (c1), 4 (c3), 2 (c1 again), 3 (c2)
    out = mine_diverse_negatives(q, pool, np.array([7]), clusters, k=3)
    assert out.tolist() == [[1, 4, 3]]
    out = mine_diverse_negatives(q, pool, np.array([7]), clusters, k=5)
    assert out.tolist() == [[1, 4, 3, -1, -1]]  # only three other clusters exist


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 60),
    st.integers(1, 8),
    st.integers(0, 6),
    st.integers(0, 10_000),
)
def test_miner_properties(nq, npool, nclusters, k, seed):
    rng = np.random.default_rng(seed)
    q = _unit(rng, nq, 6)
    pool = _unit(rng, npool, 6)
    qc = rng.integers(0, nclusters, nq)
    pc = rng.integers(0, nclusters, npool)
    out = mine_diverse_negatives(q, pool, qc, pc, k, chunk=5)
    assert out.shape == (nq, k)
    for i, row in enumerate(out):
        got = row[row >= 0]
        assert (row[len(got):] == -1).all()  # found ones first, padding after
        cl = pc[got]
        assert len(set(cl.tolist())) == len(cl)  # never two of one cluster
        assert qc[i] not in set(cl.tolist())  # never a positive (same cluster) as a negative
        available = len(set(pc.tolist()) - {qc[i]})
        assert len(got) == min(k, available)
        if len(got):
            sims = pool @ q[i]
            # the first is the hardest negative: the most similar pool item of another cluster
            assert sims[got[0]] == pytest.approx(sims[pc != qc[i]].max())
            # and each pick is the most similar item of a not-yet-used other cluster
            s = sims[got]
            assert (np.diff(s) <= 1e-6).all()


def test_hardest_positive():
    q = np.array([1.0, 0.0])
    cands = np.array([[0.9, 0.436], [0.2, 0.98], [1.0, 0.0]])
    assert hardest_positive(q, cands) == 1
    with pytest.raises(ValueError, match="candidate"):
        hardest_positive(q, np.zeros((0, 2)))


def test_mean_class_similarities_by_hand():
    from cbir.training.mining import mean_class_similarities

    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    y = np.array([0, 0, 0, 1])
    m, classes = mean_class_similarities(x, y, chunk=3)
    assert classes.tolist() == [0, 1]
    assert m[0].tolist() == pytest.approx([0.3, 1.0])  # own class leave-one-out; class 1 = {x3}
    assert m[2].tolist() == pytest.approx([0.7, 0.6])
    assert m[3].tolist() == pytest.approx([(1 + 0 + 0.6) / 3, np.nan], nan_ok=True)


def test_leave_one_out_similarity_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    y = np.array([0, 0, 0, 1])
    s = leave_one_out_class_similarity(x, y)
    assert s[:3] == pytest.approx([(0 + 0.6) / 2, (0 + 0.8) / 2, (0.6 + 0.8) / 2])
    assert np.isnan(s[3])


def _planted(seed, n_classes=6, per_class=20, noise=0.6, planted=2, d=32):
    """Classes of noisy copies of a class centre, plus ``planted`` members per class copied from
    another class's distribution (mislabelled images)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng, n_classes, d)
    xs, ys, bad = [], [], []
    for c in range(n_classes):
        for _ in range(per_class):
            xs.append(centres[c] + noise * rng.normal(size=d) / np.sqrt(d))
            ys.append(c)
            bad.append(False)
        for _ in range(planted):
            other = (c + 1 + rng.integers(n_classes - 1)) % n_classes
            xs.append(centres[other] + noise * rng.normal(size=d) / np.sqrt(d))
            ys.append(c)
            bad.append(True)
    x = np.array(xs)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.array(ys), np.array(bad)


@pytest.mark.parametrize("seed", range(5))
def test_cleaning_drops_planted_mislabelled_members(seed):
    x, y, bad = _planted(seed)
    keep = class_consistency_mask(x, y, k=3.0)
    assert not keep[bad].any()  # every planted member is dropped
    assert keep[~bad].mean() >= 0.95  # and nearly every genuine one kept
    # the robust-outlier part alone catches them too in these well-separated classes
    assert not class_consistency_mask(x, y, k=3.0, nearest_class=False)[bad].any()


def test_nearest_class_rule_by_hand():
    # class A tight around e0 with one member equal to e1 (= class B's direction): only the
    # nearest-class part of the rule drops it when A's spread is large
    e0, e1 = np.eye(2)
    xa = np.array([e0, e0, e0, [0.8, 0.6], e1])
    xb = np.array([e1, e1, e1, e1])
    x = np.vstack([xa, xb])
    y = np.array([0] * 5 + [1] * 4)
    keep = class_consistency_mask(x, y, k=100.0)  # the outlier part is effectively off
    assert keep.tolist() == [True] * 4 + [False] + [True] * 4
    assert class_consistency_mask(x, y, k=100.0, nearest_class=False).all()


def test_cleaning_keeps_small_classes_and_is_label_name_free():
    x, y, _ = _planted(0)
    small = np.arange(len(y)) < 3
    yy = y.copy()
    yy[small] = 99  # a class of 3 members is below min_size: kept whole
    keep = class_consistency_mask(x, yy, min_size=4)
    assert keep[small].all()
    # renaming the classes or permuting the rows does not change which images are dropped
    perm = np.random.default_rng(1).permutation(len(y))
    k1 = class_consistency_mask(x, y)
    k2 = class_consistency_mask(x[perm], (y * 7 + 3)[perm])
    assert (k1[perm] == k2).all()


def test_cleaning_on_real_landmark_descriptors(rparis250_lite0, rparis250_gnd):
    """Real Lite0-GeM descriptors of the Paris photos, labelled by landmark, with 4 photos of the
    query landmarks relabelled into the wrong class: the rule drops those 4 (here it is the
    nearest-class part that catches them: Eiffel's class is too spread out for the outlier part
    alone to drop the two La Défense photos) and keeps over 90 % of the rest."""
    names = rparis250_gnd["imlist"]
    x = rparis250_lite0["db"]
    land = np.array([n.split("_")[1] for n in names])
    y = land.copy()
    # genuine photos of the query object (positives of query 0 and of query 2)
    g = rparis250_gnd["gnd"]
    wrong = [int(g[0]["easy"][0]), int(g[0]["easy"][1]), int(g[2]["easy"][0]), int(g[2]["easy"][1])]
    y[wrong[:2]] = "eiffel" if land[wrong[0]] != "eiffel" else "louvre"
    y[wrong[2:]] = "moulinrouge" if land[wrong[2]] != "moulinrouge" else "louvre"
    keep = class_consistency_mask(x, y, k=3.0)
    assert not keep[wrong].any()
    others = np.ones(len(y), dtype=bool)
    others[wrong] = False
    assert keep[others].mean() > 0.9  # measured: 93 % (landmark classes hold varied photos)
