"""Query expansion (average, alpha-weighted) and DBA: hand-computed values, batching, real data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbir.linalg import l2_normalize
from cbir.rerank.knn import topk
from cbir.rerank.qe import alpha_qe, average_qe, dba


def _unit(*v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_topk_sorted_and_stable():
    s = np.array([[0.1, 0.9, 0.5, 0.9, -1.0]])
    vals, idx = topk(s, 3)
    assert idx.tolist() == [[1, 3, 2]] and vals.tolist() == [[0.9, 0.9, 0.5]]
    assert topk(s, 10)[1].shape == (1, 5)


def test_topk_is_the_stable_sort_at_the_cut_too():
    """Many ties at the k-th value: the lower indices go in (the first k of a stable argsort)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 200))
        k = int(rng.integers(1, n + 1))
        s = rng.integers(0, 4, (3, n)).astype(np.float32) / 4  # few distinct values: ties everywhere
        vals, idx = topk(s, k)
        want = np.argsort(-s, axis=1, kind="stable")[:, :k]
        assert np.array_equal(idx, want) and np.array_equal(vals, np.take_along_axis(s, want, axis=1))


def test_average_and_alpha_qe_by_hand():
    db = np.array([_unit(1, 0), _unit(1, 1), _unit(0, 1), _unit(-1, 0.2)], dtype=np.float32)
    q = np.array([_unit(1, 0.3)], dtype=np.float32)
    s = (q @ db.T)[0]
    order = np.argsort(-s)  # by hand: [0, 1, 2, 3]
    assert order[:2].tolist() == [0, 1]
    exp_avg = _unit(*(q[0] + db[0] + db[1]))
    np.testing.assert_allclose(average_qe(q, db, 2)[0], exp_avg, atol=1e-6)
    exp_alpha = _unit(*(q[0] + s[0] ** 3 * db[0] + s[1] ** 3 * db[1]))
    np.testing.assert_allclose(alpha_qe(q, db, 2, alpha=3)[0], exp_alpha, atol=1e-6)
    # alpha = 0 is average QE; k = 0 leaves the query
    np.testing.assert_allclose(alpha_qe(q, db, 2, alpha=0), average_qe(q, db, 2), atol=1e-7)
    np.testing.assert_array_equal(alpha_qe(q, db, 0), q)
    # negative similarities get zero weight
    q2 = np.array([_unit(-1, 0.3)], dtype=np.float32)  # top-2: db[3] (s>0), db[2] (s>0)...
    s2 = (q2 @ db.T)[0]
    _, idx = topk(s2[None], 4)
    w = np.maximum(s2[idx[0]], 0) ** 3
    np.testing.assert_allclose(alpha_qe(q2, db, 4, alpha=3)[0], _unit(*(q2[0] + (w[:, None] * db[idx[0]]).sum(0))), atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 8), alpha=st.sampled_from([0.0, 1.0, 3.0]))
def test_batched_qe_equals_one_query_at_a_time(seed, k, alpha):
    rng = np.random.default_rng(seed)
    db = l2_normalize(rng.normal(size=(50, 6)))
    q = l2_normalize(rng.normal(size=(7, 6)))
    batched = alpha_qe(q, db, k, alpha=alpha)
    for i in range(7):
        np.testing.assert_allclose(batched[i], alpha_qe(q[i : i + 1], db, k, alpha=alpha)[0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)


def test_dba_by_hand():
    db = np.array([_unit(1, 0), _unit(1, 0.2), _unit(0, 1), _unit(0.1, 1)], dtype=np.float32)
    np.testing.assert_array_equal(dba(db, 1), db)
    out = dba(db, 2)  # each vector averaged with its nearest other vector
    np.testing.assert_allclose(out[0], _unit(*(db[0] + db[1])), atol=1e-6)
    np.testing.assert_allclose(out[3], _unit(*(db[3] + db[2])), atol=1e-6)
    s01 = float(db[0] @ db[1])
    np.testing.assert_allclose(dba(db, 2, alpha=3)[0], _unit(*(db[0] + s01**3 * db[1])), atol=1e-6)


def test_bad_shapes():
    with pytest.raises(ValueError, match="dimension"):
        alpha_qe(np.zeros((2, 3)), np.zeros((5, 4)), 2)
    with pytest.raises(ValueError, match="2-D"):
        dba(np.zeros(5), 2)


@pytest.mark.shared
def test_qe_and_dba_raise_medium_and_hard_on_real_oxford(oxford_fc7, roxford_gnd):
    from cbir.evaluation import evaluate_revisitop

    x, names = oxford_fc7
    row = {n: i for i, n in enumerate(names)}
    q = x[[row[n] for n in roxford_gnd["qimlist"]]]
    db = x[[row[n] for n in roxford_gnd["imlist"]]]
    raw = evaluate_revisitop(q @ db.T, roxford_gnd)["mAP"]
    qe = evaluate_revisitop(alpha_qe(q, db, 5, alpha=3) @ db.T, roxford_gnd)["mAP"]
    aqe = evaluate_revisitop(average_qe(q, db, 5) @ db.T, roxford_gnd)["mAP"]
    dbx = dba(db, 5, alpha=3)
    dba_m = evaluate_revisitop(q @ dbx.T, roxford_gnd)["mAP"]
    for res in (qe, aqe, dba_m):
        assert res["medium"] > raw["medium"] + 0.5
        assert res["hard"] > raw["hard"] + 0.5


def test_qe_and_diffusion_do_not_import_each_other():
    """Both use cbir.rerank.knn; no import (top-level or inside a function) between them."""
    import ast
    import inspect

    import cbir.rerank.diffusion as diffusion_mod
    import cbir.rerank.qe as qe_mod

    def imported(mod):
        names = set()
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
        return names

    assert ".diffusion" not in imported(qe_mod) and "cbir.rerank.diffusion" not in imported(qe_mod)
    assert ".qe" not in imported(diffusion_mod) and "cbir.rerank.qe" not in imported(diffusion_mod)
    assert ".knn" in imported(qe_mod) and ".knn" in imported(diffusion_mod)
