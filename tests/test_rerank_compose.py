"""The re-ranking chain with spatial verification (cbir.rerank.compose), with a fake verifier:
hand-computed orders and expansions, the query's own photo, what the verifier is asked, recipes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbir.linalg import l2_normalize
from cbir.rerank.compose import SAME_IMAGE, Rerank, rerank
from cbir.rerank.recipe import Recipe
from cbir.rerank.verify import VerifyParams
from cbir.schema import SchemaError

# 1 query, 6 database rows in 3-D; base scores q . x = 0.9, 0.8, 0.7, 0.6, 0.5, 0.1
Q = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
S0 = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
DB = np.stack([np.array([s, np.sqrt(1 - s * s), 0.0]) if i % 2 == 0 else np.array([s, 0.0, np.sqrt(1 - s * s)])
               for i, s in enumerate(S0)]).astype(np.float32)


class Fake:
    """A verifier with fixed inlier counts per database row; records what it is asked."""

    def __init__(self, counts: dict[int, int]):
        self.counts = counts
        self.asked: list[tuple[int, list[int]]] = []

    def __call__(self, i: int, rows) -> np.ndarray:
        rows = [int(r) for r in rows]
        self.asked.append((i, rows))
        return np.array([self.counts.get(r, 0) for r in rows])


def order(scores: np.ndarray) -> list[int]:
    return np.argsort(-scores[0], kind="stable").tolist()


def test_verified_first_without_expansion_keeps_their_order():
    fake = Fake({3: 40, 1: 15, 4: 200})  # row 4 is outside the top 4: never asked, never moved
    scores, applied = Rerank(verify=VerifyParams(k=4, expand=False, min_inliers=15)).apply(Q, DB, fake)
    assert fake.asked == [(0, [0, 1, 2, 3])]
    assert order(scores) == [1, 3, 0, 2, 4, 5]  # verified 1 (15) and 3 (40) first, in base order
    b = 0.9 - 0.1 + 1.0  # the row's span + 1
    np.testing.assert_allclose(scores[0], [0.9, 0.8 + b, 0.7, 0.6 + b, 0.5, 0.1], atol=1e-6)
    assert applied["verify"]["verified"] == 2 and applied["verify"]["queries_verified"] == 1


def test_order_by_inliers_and_min_inliers():
    fake = Fake({3: 40, 1: 15})
    scores, _ = Rerank(verify=VerifyParams(k=4, expand=False, order="inliers", min_inliers=15)).apply(Q, DB, fake)
    assert order(scores) == [3, 1, 0, 2, 4, 5]
    scores, _ = Rerank(verify=VerifyParams(k=4, expand=False, min_inliers=16)).apply(Q, DB, fake)
    assert order(scores) == [3, 0, 1, 2, 4, 5]  # 15 inliers: no longer verified


def test_verified_expansion_by_hand():
    fake = Fake({2: 30})
    scores, _ = Rerank(verify=VerifyParams(k=4, order="none")).apply(Q, DB, fake)
    q2 = Q[0] + DB[2]
    q2 /= np.linalg.norm(q2)  # q' = l2(q + x_2)
    np.testing.assert_allclose(scores[0], DB @ q2, atol=1e-6)
    # rows 2 and 4 (on x_2's second axis) now beat row 1 (0.8, 0, 0.6), which was above them
    got = order(scores)
    assert got.index(2) < got.index(1) and got.index(4) < got.index(1)


def test_expansion_then_qe_then_verified_first():
    """Steps in order: verify -> q' -> alpha-QE from q' -> verified first."""
    from cbir.rerank.qe import alpha_qe

    fake = Fake({5: 20})  # the worst image verifies (k = 6: all are verified)
    scores, applied = Rerank(qe=1, alpha_qe=0.0, verify=VerifyParams(k=6)).apply(Q, DB, fake)
    q2 = l2_normalize((Q[0] + DB[5])[None])
    q3 = alpha_qe(q2, DB, 1, alpha=0.0)
    s = (q3 @ DB.T)[0].astype(np.float64)
    s[5] += s.max() - s.min() + 1.0
    np.testing.assert_allclose(scores[0], s, atol=1e-5)
    assert order(scores)[0] == 5 and list(applied) == ["verify", "qe"]


def test_the_query_own_photo_is_first_but_never_an_expansion_seed():
    fake = Fake({0: SAME_IMAGE, 3: 30})
    scores, applied = Rerank(verify=VerifyParams(k=4, order="none")).apply(Q, DB, fake)
    q2 = l2_normalize((Q[0] + DB[3])[None])[0]  # without row 0 (the query itself)
    np.testing.assert_allclose(scores[0], DB @ q2, atol=1e-6)
    assert applied["verify"]["same_image"] == 1 and applied["verify"]["verified"] == 1
    scores, _ = Rerank(verify=VerifyParams(k=4, order="inliers")).apply(Q, DB, Fake({3: 30, 0: SAME_IMAGE}))
    assert order(scores)[:2] == [0, 3]
    # "first": the own photo above every verified image, whatever the final scores
    big = Fake({4: 500, 0: SAME_IMAGE})
    scores, _ = Rerank(verify=VerifyParams(k=5)).apply(Q, DB, big)
    assert order(scores)[:2] == [0, 4]


def test_verify_needs_a_verifier_and_counts_per_candidate():
    with pytest.raises(ValueError, match="^verify needs local features: "):
        Rerank(verify=VerifyParams()).apply(Q, DB)
    with pytest.raises(ValueError, match="returned 2 inlier counts for 3 candidates"):
        rerank(Q, DB, verify=VerifyParams(k=3), verifier=lambda i, rows: np.zeros(2))
    # without verify nothing asks a verifier, and the scores are the plain ones
    scores, applied = Rerank().apply(Q, DB, Fake({}))
    np.testing.assert_allclose(scores[0], S0, atol=1e-6)
    assert applied == {}


def test_prototype_expansion_in_the_recipe_whitened_space_before_the_default_reranking():
    """The issue's prototype: the query + its top-50 photos with >= 15 inliers, in the recipe's
    whitened space, then the default re-ranking (QE, DBA, diffusion)."""
    from cbir.rerank.qe import dba

    rng = np.random.default_rng(0)
    centers = l2_normalize(rng.normal(size=(8, 32)))
    db = l2_normalize(centers[np.arange(120) % 8] + 0.5 * rng.normal(size=(120, 32))).astype(np.float32)
    q = l2_normalize(centers[:3] + 0.5 * rng.normal(size=(3, 32))).astype(np.float32)
    counts = {(i, r): (25 if r % 8 == i else 0) for i in range(3) for r in range(120)}  # the same cluster verifies
    verifier = lambda i, rows: np.array([counts[(i, int(r))] for r in rows])  # noqa: E731
    base = Recipe.load("holidays805-lite0")
    proto = base.with_verify(VerifyParams(k=50, min_inliers=15, order="none", expand=True))
    scores, applied = proto.apply(q, db, verifier)
    # by hand: whiten, DBA, top 50 by the whitened scores, q' = l2(q + verified), then the recipe's chain from q'
    w = base.whitening_for(db)
    qw, dbw = w.apply(q), w.apply(db)
    dbd = dba(dbw, base.rerank.dba, alpha=base.rerank.dba_alpha)
    top = np.argsort(-(qw @ dbd.T), axis=1, kind="stable")[:, :50]
    q2 = np.stack([qw[i] + dbd[[r for r in top[i] if r % 8 == i]].sum(0) for i in range(3)])
    want, _ = base.rerank.apply(l2_normalize(q2), dbw)
    np.testing.assert_allclose(scores, want, atol=1e-5)
    assert applied["recipe"]["whitening"]["method"] == "pca" and applied["verify"]["verified"] > 3


def test_rerank_dict_round_trip_and_strict_values():
    r = Rerank(qe=2, verify={"k": 50, "order": "inliers", "expand": False})
    assert Rerank.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert "verify" not in Rerank(qe=2).to_dict()  # off: left out, the file reads as before
    assert Rerank(verify={}).verify == VerifyParams() and not Rerank(verify={}).is_off()
    for bad, msg in [({"k": 2.5}, r"verify.k: must be an integer in \[1, 10000\] \(got 2.5\)"),
                     ({"k": "100"}, r'verify.k: must be an integer .*\(got "100"\)'),
                     ({"k": 0}, r"verify.k: must be an integer in \[1, 10000\] \(got 0\)"),
                     ({"expand": 1}, r"verify.expand: must be true or false \(got 1\)"),
                     ({"order": "sideways"}, r"verify.order: must be 'none', 'first', 'inliers' or 'add'"),
                     ({"weight": float("nan")}, r"verify.weight: must be a finite number .*\(got NaN\)"),
                     ({"kk": 3}, r"verify.kk: unknown key"),
                     (100, r"verify: must be an object of verification parameters, or null \(got 100\)")]:
        with pytest.raises(SchemaError, match="^Rerank: " + msg):
            Rerank(verify=bad)


def test_recipe_file_round_trip_with_verify(tmp_path):
    base = Recipe.load("holidays805-lite0")
    assert base.verify is None
    v = VerifyParams(k=50, min_inliers=20, order="first", expand=True)
    base.with_verify(v).save(tmp_path / "v.json")
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["format_version"] == 2 and doc["rerank"]["verify"]["k"] == 50
    back = Recipe.load(tmp_path / "v.json")
    assert back.verify == v and back.spec == base.spec and back.rerank.with_verify(None) == base.rerank
    base.save(tmp_path / "plain.json")  # no verification: still written as v1 (older cbir reads it)
    assert json.loads((tmp_path / "plain.json").read_text())["format_version"] == 1
    # verify in a v1 file, or a bad value: one line naming the file and the field
    doc["format_version"] = 1
    (tmp_path / "bad1.json").write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match=r"bad1.json: rerank: verify needs format_version 2"):
        Recipe.load(tmp_path / "bad1.json")
    doc["format_version"] = 2
    doc["rerank"]["verify"]["min_inliers"] = -1
    (tmp_path / "bad2.json").write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match=r"^recipe .*bad2.json: rerank.verify.min_inliers: must be an integer"):
        Recipe.load(tmp_path / "bad2.json")
    doc["format_version"] = 3
    (tmp_path / "bad3.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="version"):
        Recipe.load(tmp_path / "bad3.json")
