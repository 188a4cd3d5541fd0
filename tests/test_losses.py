"""Losses against their definitions, computed by hand on small inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cbir.training.losses import (
    APLoss,
    ContrastiveLoss,
    TripletLoss,
    ap_loss,
    average_precision,
    binned_average_precision,
    build_loss,
    contrastive_loss,
    soft_bin_assign,
    triplet_loss,
)

Q = torch.tensor([[1.0, 0.0]])
P = torch.tensor([[0.6, 0.8]])
N = torch.tensor([[[0.0, 1.0], [0.8, 0.6]]])  # (B=1, K=2, D=2)


def test_contrastive_by_hand():
    # ‖q−p‖² = 0.4² + 0.8² = 0.8 -> ½·0.8 = 0.4
    # ‖q−n1‖ = √2 > 0.75 -> 0 ;  ‖q−n2‖ = √(0.2² + 0.6²) = √0.4 -> ½(0.75 − √0.4)²
    expected = 0.4 + 0.0 + 0.5 * (0.75 - math.sqrt(0.4)) ** 2
    assert contrastive_loss(Q, P, N, margin=0.75).item() == pytest.approx(expected, rel=1e-6)
    assert ContrastiveLoss(0.75)(Q, P, N).item() == pytest.approx(expected, rel=1e-6)
    # a larger margin makes the first negative count too: ½(1.5 − √2)²
    expected15 = 0.4 + 0.5 * (1.5 - math.sqrt(2)) ** 2 + 0.5 * (1.5 - math.sqrt(0.4)) ** 2
    assert contrastive_loss(Q, P, N, margin=1.5).item() == pytest.approx(expected15, rel=1e-6)


def test_contrastive_mean_over_tuples():
    q2, p2, n2 = torch.cat([Q, P]), torch.cat([P, P]), torch.cat([N, N])
    one = contrastive_loss(Q, P, N, 0.75)
    # tuple 2: anchor p=[.6,.8] equals its positive; ‖p−n1‖² = .36+.04 ; ‖p−n2‖² = .04+.04
    second = 0.5 * max(0.0, 0.75 - math.sqrt(0.36 + 0.04)) ** 2 + 0.5 * max(0.0, 0.75 - math.sqrt(0.08)) ** 2
    assert contrastive_loss(q2, p2, n2, 0.75).item() == pytest.approx((one.item() + second) / 2, rel=1e-6)


def test_triplet_by_hand():
    # d(q,p)² = 0.8 ; d(q,n1)² = 2 ; d(q,n2)² = 0.4
    m = 0.1
    expected = (max(0.0, 0.8 - 2.0 + m) + max(0.0, 0.8 - 0.4 + m)) / 2
    assert triplet_loss(Q, P, N, margin=m).item() == pytest.approx(expected, rel=1e-6)
    assert TripletLoss(m)(Q, P, N).item() == pytest.approx(expected, rel=1e-6)
    assert triplet_loss(Q, P, N, margin=2.0).item() == pytest.approx(((0.8 - 2 + 2) + (0.8 - 0.4 + 2)) / 2, rel=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="negatives"):
        contrastive_loss(Q, P, N[0])
    with pytest.raises(ValueError, match="positives"):
        triplet_loss(Q, P[:, :1], N)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge")


def test_soft_bins_by_hand():
    # 3 bins over [-1, 1]: centres 1, 0, -1; Δ = 1
    w = soft_bin_assign(torch.tensor([0.9, 0.5, -0.2, 2.0]), 3)
    expected = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.0, 0.8, 0.2], [1.0, 0.0, 0.0]])
    assert torch.allclose(w, expected, atol=1e-6)


def test_binned_ap_by_hand():
    # scores 0.9 (rel), 0.5 (non-rel), -0.2 (rel) with the 3 bins above:
    # positives per bin [0.9, 0.9, 0.2], all per bin [1.4, 1.4, 0.2]
    # P = [0.9/1.4, 1.8/2.8, 2.0/3.0], r = [0.45, 0.45, 0.1]
    s = torch.tensor([[0.9, 0.5, -0.2]])
    y = torch.tensor([[1, 0, 1]])
    expected = 0.9 / 1.4 * 0.45 + 1.8 / 2.8 * 0.45 + 2.0 / 3.0 * 0.1
    assert binned_average_precision(s, y, nbins=3).item() == pytest.approx(expected, rel=1e-6)
    assert ap_loss(s, y, nbins=3).item() == pytest.approx(1 - expected, rel=1e-6)
    # the exact AP of that ranking is (1/1 + 2/3)/2
    assert average_precision(s, y).item() == pytest.approx((1 + 2 / 3) / 2)


def test_binned_ap_is_exact_when_each_score_sits_on_its_own_bin_centre():
    torch.manual_seed(0)
    nbins = 41
    centres = torch.linspace(1, -1, nbins, dtype=torch.float64)
    for _ in range(20):
        pick = torch.randperm(nbins)[:15]
        s = centres[pick].unsqueeze(0)
        y = (torch.rand(1, 15) < 0.4).long()
        y[0, 3] = 1
        assert binned_average_precision(s, y, nbins).item() == pytest.approx(average_precision(s, y).item(), abs=1e-9)


def test_binned_ap_approaches_true_ap_as_bins_grow():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(200, 100, generator=g, dtype=torch.float64) * 2 - 1
    y = (torch.rand(200, 100, generator=g) < 0.2).long()
    y[:, 0] = 1
    true = average_precision(s, y)
    errs = {m: (binned_average_precision(s, y, m) - true).abs().mean().item() for m in (5, 10, 25, 100, 1000)}
    assert errs[5] > errs[10] > errs[25] > errs[100] > errs[1000]
    assert errs[1000] < 0.01 < errs[5]
    # with 1000 bins, the loss ranks queries as the true AP does
    corr = torch.corrcoef(torch.stack([binned_average_precision(s, y, 1000), true]))[0, 1]
    assert corr > 0.99


def test_ap_loss_gradients_are_finite_and_informative():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(12, 16), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    scores = x @ x.T
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(12, dtype=torch.bool)
    loss = ap_loss(scores[off].view(12, 11), same[off].view(12, 11).long())
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # ties everywhere (all scores equal) and scores outside the bin range still give finite grads
    z = torch.zeros(3, 5, requires_grad=True)
    lab = torch.tensor([[1, 0, 0, 1, 0]] * 3)
    ap_loss(z, lab).backward()
    assert torch.isfinite(z.grad).all()
    w = torch.full((2, 4), 1.5, requires_grad=True)
    ap_loss(w, torch.tensor([[1, 0, 0, 0]] * 2)).backward()
    assert torch.isfinite(w.grad).all()
    # one gradient step on the AP loss raises the true AP
    with torch.no_grad():
        before = average_precision((x @ x.T)[off].view(12, 11), same[off].view(12, 11)).mean()
        y = x - 0.5 * x.grad
        y = torch.nn.functional.normalize(y, dim=1)
        after = average_precision((y @ y.T)[off].view(12, 11), same[off].view(12, 11)).mean()
    assert after > before


def test_ap_module_on_tuples():
    # two clusters, identical vectors within a cluster, orthogonal across: every AP is 1
    e = torch.eye(4)
    q = e[[0, 1]]
    p = e[[0, 1]]
    n = e[[2, 3]].unsqueeze(1)  # (2, 1, 4)
    assert APLoss(25)(q, p, n).item() == pytest.approx(0.0, abs=1e-6)
    # swapping the positives makes each anchor's relevant item the least similar
    bad = APLoss(25)(q, p[[1, 0]], n)
    assert bad.item() > 0.4
    # clusters given explicitly: anchor 0 and 1 of the same cluster are relevant to each other
    clusters = torch.tensor([0, 0, 0, 0, 1, 2])
    assert APLoss(25)(q, p, n, clusters=clusters).item() > 0.0
    assert isinstance(build_loss("ap", nbins=10), APLoss)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(2, 8),
    st.floats(0.05, 1.5),
    st.integers(0, 10_000),
)
def test_loss_properties(b, k, d, margin, seed):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    q = norm(torch.randn(b, d, generator=g), dim=1)
    p = norm(torch.randn(b, d, generator=g), dim=1)
    n = norm(torch.randn(b, k, d, generator=g), dim=2)
    c = contrastive_loss(q, p, n, margin)
    t = triplet_loss(q, p, n, margin)
    assert c >= 0 and t >= 0
    # negatives farther than the margin cost nothing; identical positives cost nothing
    assert contrastive_loss(q, q, n, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    # permuting the negatives of a tuple changes nothing
    perm = torch.randperm(k, generator=g)
    assert torch.allclose(triplet_loss(q, p, n[:, perm], margin), t, atol=1e-6)
    assert torch.allclose(contrastive_loss(q, p, n[:, perm], margin), c, atol=1e-6)
    a = APLoss(25)(q, p, n)
    assert -1e-6 <= a.item() <= 1 + 1e-6
