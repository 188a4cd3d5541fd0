"""Evaluation protocols against hand-computed values and a naive reference implementation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbir.evaluation import (
    average_precision,
    compute_map,
    evaluate_original,
    evaluate_revisitop,
    map_at_k,
    rank_from_scores,
    recall_at_k,
    revisitop_protocols,
)

# --------------------------------------------------------------------------------------------
# A deliberately naive implementation, written from the protocol's definition (Radenović et al.
# CVPR'18, revisitop): walk the ranking, drop junk images, and integrate precision over recall
# with the trapezoid rule (precision before a positive taken at the previous rank, 1 at rank 0).
# --------------------------------------------------------------------------------------------


def naive_ranking(scores_row, ndb):
    """Full ranking: higher score first, ties by lower index (Python's sort is stable)."""
    return sorted(range(ndb), key=lambda d: (-float(scores_row[d]), d))


def naive_ap_and_pr(ranking, ok, junk, kappas=(1, 5, 10)):
    ok, junk = set(ok), set(junk)
    if not ok:
        return None, None
    kept = [d for d in ranking if d in ok or d not in junk]  # junk removed from the list
    ap = 0.0
    found = 0
    positions = []  # 1-based positions of positives after junk removal
    for rank, d in enumerate(kept):
        if d in ok:
            precision_before = 1.0 if rank == 0 else found / rank
            found += 1
            precision_at = found / (rank + 1)
            ap += (precision_before + precision_at) / 2 / len(ok)
            positions.append(rank + 1)
    prs = []
    for k in kappas:
        kq = min(max(positions), k)
        prs.append(sum(1 for p in positions if p <= kq) / kq)
    return ap, prs


def naive_revisitop(scores, gnd_list, kappas=(1, 5, 10)):
    """{"mAP": {protocol: %}, "mP": {protocol: {k: %}}} by the definition, one query at a time."""
    out = {"mAP": {}, "mP": {}}
    nq, ndb = scores.shape
    rankings = [naive_ranking(scores[i], ndb) for i in range(nq)]
    for proto in ("easy", "medium", "hard"):
        aps, prs = [], []
        for i, g in enumerate(gnd_list):
            easy, hard, junk = list(g["easy"]), list(g["hard"]), list(g["junk"])
            ok, jk = {
                "easy": (easy, junk + hard),
                "medium": (easy + hard, junk),
                "hard": (hard, junk + easy),
            }[proto]
            ap, pr = naive_ap_and_pr(rankings[i], ok, jk, kappas)
            if ap is not None:
                aps.append(ap)
                prs.append(pr)
        if not aps:
            out["mAP"][proto] = float("nan")
            out["mP"][proto] = {k: float("nan") for k in kappas}
            continue
        out["mAP"][proto] = 100 * sum(aps) / len(aps)
        out["mP"][proto] = {k: 100 * sum(p[t] for p in prs) / len(prs) for t, k in enumerate(kappas)}
    return out


# --------------------------------------------------------------------------------------------
# hand-made rankings
# --------------------------------------------------------------------------------------------


def test_ap_hand_computed():
    # ranking [P, n, P, n]: positives at 0 and 2
    # j=0, r=0: (1 + 1/1)/2 = 1 ; j=1, r=2: (1/2 + 2/3)/2 = 7/12 ; AP = (1 + 7/12)/2 = 19/24
    res = compute_map(np.array([[5, 1, 7, 2]]), [{"ok": [5, 7], "junk": []}])
    assert res.map == pytest.approx(19 / 24, abs=1e-12)
    assert average_precision(np.array([0, 2]), 2) == pytest.approx(19 / 24, abs=1e-12)
    # a perfect ranking has AP 1; the only positive last of 4 has (0/3 + 1/4)/2 = 1/8
    assert compute_map(np.array([[0, 1, 2, 3]]), [{"ok": [0, 1]}]).map == pytest.approx(1.0)
    assert compute_map(np.array([[0, 1, 2, 3]]), [{"ok": [3]}]).map == pytest.approx(1 / 8)


@pytest.mark.parametrize("junk_at", range(5))
def test_junk_in_every_position_is_removed(junk_at):
    # without junk: [n, P, n, P] -> positives at 1, 3:
    # j=0, r=1: (0/1 + 1/2)/2 = 1/4 ; j=1, r=3: (1/3 + 2/4)/2 = 5/12 ; AP = (1/4 + 5/12)/2 = 1/3
    base = [10, 11, 12, 13]
    ranking = base[:junk_at] + [99] + base[junk_at:]
    res = compute_map(np.array([ranking]), [{"ok": [11, 13], "junk": [99]}])
    assert res.map == pytest.approx(1 / 3, abs=1e-12)
    # if 99 were a plain negative the AP would differ, except when it sits after the last positive
    plain = compute_map(np.array([ranking]), [{"ok": [11, 13], "junk": []}]).map
    assert (plain == pytest.approx(1 / 3)) == (junk_at == 4)


def test_many_junk_everywhere():
    # junk before, between and after the positives: same AP as the junk-free ranking [P, n, P]
    # j=0, r=0: 1 ; j=1, r=2: (1/2 + 2/3)/2 = 7/12 ; AP = 19/24
    ranking = [90, 91, 1, 92, 2, 93, 94, 3, 95]
    res = compute_map(np.array([ranking]), [{"ok": [1, 3], "junk": [90, 91, 92, 93, 94, 95]}])
    assert res.map == pytest.approx(19 / 24, abs=1e-12)


def test_empty_positives_are_nan_and_left_out():
    ranks = np.array([[0, 1, 2], [0, 1, 2]])
    res = compute_map(ranks, [{"ok": [], "junk": [1]}, {"ok": [2], "junk": []}])
    assert math.isnan(res.aps[0]) and np.isnan(res.prs[0]).all()
    # the mean is over the one query with a positive: last of 3 -> (0/2 + 1/3)/2 = 1/6
    assert res.map == pytest.approx(1 / 6)
    assert math.isnan(compute_map(ranks[:1], [{"ok": []}]).map)


def test_ties_broken_by_lower_index():
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])
    assert rank_from_scores(scores).tolist() == [[0, 1, 2, 3]]
    # positive 2 sits behind the tied 0 and 1: (0/2 + 1/3)/2 = 1/6 ; positive 0 comes first: 1
    assert compute_map(scores, [{"ok": [2]}]).map == pytest.approx(1 / 6)
    assert compute_map(scores, [{"ok": [0]}]).map == pytest.approx(1.0)
    # the same with a top-k cut inside the tie: the lower indices make the cut
    assert rank_from_scores(scores, top_k=2).tolist() == [[0, 1]]


def test_mp_at_k_revisitop_definition():
    # positives at 1-based positions 2 and 3 (after junk removal); the junk image is dropped
    ranks = np.array([[7, 9, 1, 2, 3, 4]])
    res = compute_map(ranks, [{"ok": [1, 2], "junk": [9]}], kappas=(1, 2, 5, 10))
    # k=1: kq=min(3,1)=1 -> 0/1 ; k=2: kq=2 -> 1/2 ; k=5, 10: kq = 3 -> 2/3
    assert res.prs[0].tolist() == pytest.approx([0.0, 0.5, 2 / 3, 2 / 3])


def test_revisitop_protocols_hand_case():
    # db 0..5; query: easy {0}, hard {3}, junk {1}; ranking by index
    g = [{"easy": [0], "hard": [3], "junk": [1], "bbx": [0, 0, 1, 1]}]
    ranks = np.array([[0, 1, 2, 3, 4, 5]])
    out = evaluate_revisitop(ranks, g)
    # Easy: ok {0}, junk {1,3} -> 0 at r=0 -> AP 1
    assert out["mAP"]["easy"] == pytest.approx(100.0)
    # Medium: ok {0,3}, junk {1} -> kept [0,2,3,4,5]: r=0 -> 1 ; r=2, j=1: (1/2 + 2/3)/2 = 7/12
    assert out["mAP"]["medium"] == pytest.approx(100 * (1 + 7 / 12) / 2)
    # Hard: ok {3}, junk {1,0} -> kept [2,3,4,5]: r=1, j=0: (0 + 1/2)/2 = 1/4
    assert out["mAP"]["hard"] == pytest.approx(25.0)
    p = revisitop_protocols({"gnd": g})
    assert sorted(p["hard"][0]["junk"].tolist()) == [0, 1]


def test_top_k_cut_counts_positives_below_as_missed():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    gnd = [{"ok": [0, 4], "junk": []}]
    full = compute_map(scores, gnd).map  # positives at 0 and 4: (1 + (1/4 + 2/5)/2)/2
    assert full == pytest.approx((1 + (1 / 4 + 2 / 5) / 2) / 2)
    cut = compute_map(scores, gnd, top_k=3).map  # 4 is below the cut: only the first term, / 2
    assert cut == pytest.approx(1 / 2)
    # when every positive is inside the cut nothing changes
    assert compute_map(scores, [{"ok": [0, 2]}], top_k=3).map == pytest.approx(compute_map(scores, [{"ok": [0, 2]}]).map)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="queries"):
        compute_map(np.zeros((2, 3)), [{"ok": [1]}])
    with pytest.raises(ValueError, match="NaN"):
        rank_from_scores(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="revisitop"):
        revisitop_protocols([{"easy": [1]}])


# --------------------------------------------------------------------------------------------
# properties against the naive implementation
# --------------------------------------------------------------------------------------------


@st.composite
def retrieval_problem(draw):
    nq = draw(st.integers(1, 4))
    ndb = draw(st.integers(1, 25))
    # small integer scores force many ties
    scores = np.array(
        draw(st.lists(st.lists(st.integers(0, 6), min_size=ndb, max_size=ndb), min_size=nq, max_size=nq)),
        dtype=np.float32,
    )
    gnd = []
    for _ in range(nq):
        labels = draw(st.lists(st.sampled_from("nehj"), min_size=ndb, max_size=ndb))
        gnd.append({k: [d for d, lab in enumerate(labels) if lab == k[0]] for k in ("easy", "hard", "junk")})
    return scores, gnd


@settings(max_examples=150, deadline=None)
@given(retrieval_problem())
def test_matches_naive_definition(problem):
    scores, gnd = problem
    fast = evaluate_revisitop(scores, gnd)
    ref = naive_revisitop(scores, gnd)
    for proto in ("easy", "medium", "hard"):
        if math.isnan(ref["mAP"][proto]):
            assert math.isnan(fast["mAP"][proto])
            continue
        assert fast["mAP"][proto] == pytest.approx(ref["mAP"][proto], abs=1e-9)
        for k in (1, 5, 10):
            assert fast["mP"][proto][k] == pytest.approx(ref["mP"][proto][k], abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(retrieval_problem(), st.integers(1, 30))
def test_top_k_ranking_is_prefix_of_full_ranking(problem, k):
    scores, _ = problem
    full = rank_from_scores(scores)
    top = rank_from_scores(scores, top_k=k)
    assert np.array_equal(top, full[:, : min(k, scores.shape[1])])


@settings(max_examples=100, deadline=None)
@given(retrieval_problem(), st.integers(1, 30))
def test_top_k_map_is_lower_bound_exact_when_all_found(problem, k):
    scores, gnd = problem
    proto = revisitop_protocols(gnd)["medium"]
    full = compute_map(scores, proto)
    cut = compute_map(scores, proto, top_k=k)
    ranks = rank_from_scores(scores)[:, :k]
    for i, g in enumerate(proto):
        if len(g["ok"]) == 0:
            continue
        assert cut.aps[i] <= full.aps[i] + 1e-12
        if np.isin(g["ok"], ranks[i]).all():
            assert cut.aps[i] == pytest.approx(full.aps[i], abs=1e-12)


# --------------------------------------------------------------------------------------------
# original protocol, GLDv2 mAP@100, recall@k
# --------------------------------------------------------------------------------------------


def test_original_protocol_hand_case():
    # good+ok positive {2, 4}, junk {3}: ranking [2, 3, 0, 4] -> kept [2, 0, 4]: r=0 -> 1 ;
    # r=2, j=1 -> (1/2 + 2/3)/2 = 7/12 -> AP = 19/24
    out = evaluate_original(np.array([[2, 3, 0, 4, 1]]), [{"ok": [2, 4], "junk": [3]}])
    assert out["mAP"] == pytest.approx(100 * 19 / 24)


def test_map_at_k_kaggle_definition():
    ranks = np.array([[1, 9, 2, 8], [7, 6, 5, 3], [0, 1, 2, 3]])
    relevant = [[1, 2, 3], [3], []]  # third query: no relevant images -> ignored
    # q0: P(1)=1 rel, P(3)=2/3 rel -> (1 + 2/3) / min(3, k)
    # q1: P(4)=1/4 -> 1/4 / min(1, k)
    assert map_at_k(ranks, relevant, k=100) == pytest.approx(((1 + 2 / 3) / 3 + 1 / 4) / 2)
    # k=2: q0 only the first hit (1) / min(3,2)=2 -> 1/2 ; q1 nothing -> 0
    assert map_at_k(ranks, relevant, k=2) == pytest.approx((1 / 2 + 0) / 2)


def test_recall_at_k():
    ranks = np.array([[1, 9, 2, 8], [7, 6, 5, 3], [0, 1, 2, 3]])
    relevant = [[2], [3], []]
    assert recall_at_k(ranks, relevant, ks=(1, 3, 4)) == {1: 0.0, 3: 0.5, 4: 1.0}


# --------------------------------------------------------------------------------------------
# real data, full size: Oxford5k fc7-128d with the revisitop ground truth
# --------------------------------------------------------------------------------------------


def _oxford_fc7_scores(oxford_fc7, roxford_gnd):
    x, names = oxford_fc7
    row = {n: i for i, n in enumerate(names)}
    q = x[[row[n] for n in roxford_gnd["qimlist"]]]
    db = x[[row[n] for n in roxford_gnd["imlist"]]]
    return q @ db.T


@pytest.mark.shared
def test_real_oxford5k_fc7_matches_naive(oxford_fc7, roxford_gnd, tmp_path):
    """`cbir evaluate --features` on the full 5063-image Oxford5k agrees with the naive definition."""
    from cbir.cli import main
    from cbir.descriptors import Descriptors

    x, names = oxford_fc7
    assert x.shape == (5063, 128)
    scores = _oxford_fc7_scores(oxford_fc7, roxford_gnd)
    ref = naive_revisitop(scores, roxford_gnd["gnd"])

    feats = tmp_path / "feats"
    Descriptors(ids=list(names), vectors=x, meta={"model": "caffe-fc7-pca128"}).save(feats)
    gnd_path = tmp_path / "gnd_roxford5k.pkl"
    import pickle

    with open(gnd_path, "wb") as fh:
        pickle.dump(roxford_gnd, fh)
    out = tmp_path / "res.json"
    assert main(["evaluate", "--gnd", str(gnd_path), "--features", str(feats), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    for proto in ("easy", "medium", "hard"):
        assert got["mAP"][proto] == pytest.approx(ref["mAP"][proto], abs=1e-6)
        for k in (1, 5, 10):
            assert got["mP"][proto][str(k)] == pytest.approx(ref["mP"][proto][k], abs=1e-6)
    # the library agrees too, and a generous top-k cut changes little
    lib = evaluate_revisitop(scores, roxford_gnd)
    assert lib["mAP"]["medium"] == pytest.approx(ref["mAP"]["medium"], abs=1e-9)
    cut = evaluate_revisitop(scores, roxford_gnd, top_k=1000)
    assert cut["mAP"]["medium"] <= lib["mAP"]["medium"] + 1e-9
