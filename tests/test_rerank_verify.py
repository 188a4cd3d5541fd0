"""Spatial-verification re-ranking (cbir.rerank.verify): hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.rerank.verify import (VerifyParams, apply_order, combine_scores, expand_queries, expansion_weights,
                                verified_expansion, verified_mask)

S = np.array([0.9, 0.8, 0.7, 0.6, 0.5])


def P(**kw) -> VerifyParams:
    """The hand-computed cases use a threshold of 15 inliers (whatever the shipped default)."""
    return VerifyParams(**{"min_inliers": 15, **kw})

N = np.array([3, 40, 0, 15, 100])  # verified (>= 15): positions 1, 3, 4


def _order(s: np.ndarray) -> list[int]:
    return np.argsort(-s, kind="stable").tolist()


def test_mask():
    assert verified_mask(N, 15).tolist() == [False, True, False, True, True]


def test_first_moves_verified_up_keeping_their_order():
    out = combine_scores(S, N, P(order="first"))
    b = 0.9 - 0.5 + 1.0  # 1.4
    np.testing.assert_allclose(out, [0.9, 0.8 + b, 0.7, 0.6 + b, 0.5 + b])
    assert _order(out) == [1, 3, 4, 0, 2]


def test_inliers_orders_verified_by_count():
    out = combine_scores(S, N, P(order="inliers"))
    b = 1.4
    np.testing.assert_allclose(out, [0.9, 0.8 + b * 41, 0.7, 0.6 + b * 16, 0.5 + b * 101])
    assert _order(out) == [4, 1, 3, 0, 2]
    # equal counts: the base score decides
    tie = combine_scores(np.array([0.2, 0.9]), np.array([20, 20]), P(order="inliers"))
    assert _order(tie) == [1, 0]


def test_add_is_a_bounded_bonus():
    p = P(order="add", weight=0.25, saturation=50)
    out = combine_scores(S, N, p)
    np.testing.assert_allclose(out, [0.9, 0.8 + 0.25 * 40 / 50, 0.7, 0.6 + 0.25 * 15 / 50, 0.5 + 0.25])
    assert _order(out) == [1, 0, 4, 2, 3]  # 1.0, 0.9, 0.75, 0.7, 0.675: a high base score can stay ahead


def test_none_and_min_inliers():
    np.testing.assert_allclose(combine_scores(S, N, P(order="none")), S)
    out = combine_scores(S, N, P(order="first", min_inliers=41))
    assert _order(out) == [4, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="same shape"):
        combine_scores(S, N[:3], P())


def test_apply_order_changes_only_the_top_k_and_nothing_below_overtakes():
    scores = np.array([[0.1, 0.9, 0.5, 0.8, 0.3, -0.4]])
    top = np.array([[1, 3, 2]])  # the base top 3
    inl = np.array([[0, 10, 30]])  # column 2 verified
    out = apply_order(scores, top, inl, P(order="first", min_inliers=15))
    b = 0.9 - (-0.4) + 1.0
    np.testing.assert_allclose(out, [[0.1, 0.9, 0.5 + b, 0.8, 0.3, -0.4]])
    assert _order(out[0]) == [2, 1, 3, 4, 0, 5]
    # several queries, each with its own span
    two = apply_order(np.array([[1.0, 0.0], [5.0, 2.0]]), np.array([[1], [1]]), np.array([[20], [20]]), P())
    np.testing.assert_allclose(two, [[1.0, 0.0 + 2.0], [5.0, 2.0 + 4.0]])


def test_verified_expansion_is_the_normalised_sum():
    q = np.array([1.0, 0.0, 0.0])
    rows = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = verified_expansion(q, rows, np.array([1.0, 2.0]))
    np.testing.assert_allclose(out, np.array([1.0, 1.0, 2.0]) / np.sqrt(6.0), rtol=1e-6)
    np.testing.assert_allclose(verified_expansion(q, rows[:0], np.zeros(0)), q)  # nothing verified: q


def test_expansion_weights_cap_and_kind():
    p = P(expand_max=2)
    np.testing.assert_allclose(expansion_weights(N, p), [0, 1, 0, 0, 1])  # the two with most inliers
    p = P(expand_weight="inliers", saturation=50)
    np.testing.assert_allclose(expansion_weights(N, p), [0, 0.8, 0, 0.3, 1.0])
    p = P(expand_max=1)
    np.testing.assert_allclose(expansion_weights(np.array([20, 20]), p), [1, 0])  # ties: the earlier position


def test_expand_queries_uses_the_verified_rows_of_each_query():
    db = np.eye(4, dtype=np.float32)
    q = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=np.float32)
    top = np.array([[1, 2, 3], [0, 2, 3]])
    inl = np.array([[20, 0, 16], [0, 0, 0]])
    out = expand_queries(q, db, top, inl, P())
    np.testing.assert_allclose(out[0], np.array([1, 1, 0, 1]) / np.sqrt(3), rtol=1e-6)
    np.testing.assert_allclose(out[1], q[1])


def test_params_are_checked():
    with pytest.raises(ValueError):
        VerifyParams(k=0)
    with pytest.raises(ValueError):
        VerifyParams(order="sideways")
    with pytest.raises(ValueError):
        VerifyParams(unknown=1)
