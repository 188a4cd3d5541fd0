"""Pooling math against hand-computed values and published properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cbir.pooling import (
    POOLINGS,
    BoW,
    GeM,
    bow_hard,
    bow_idf,
    bow_soft,
    build_pooling,
    crow,
    crow_channel_weights,
    crow_spatial_weights,
    fit_codebook,
    gem,
    mac,
    regional,
    rmac,
    rmac_regions,
    spoc,
)

HAND = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]], [[0.0, 0.0], [2.0, 0.0]]]])  # (1, 2, 2, 2)


def maps(min_side=1, max_side=7):
    """Random positive feature maps (B, C, H, W)."""
    return st.tuples(
        st.integers(1, 3), st.integers(1, 5), st.integers(min_side, max_side), st.integers(min_side, max_side),
        st.integers(0, 2**31 - 1),
    ).map(lambda t: torch.rand(t[:4], generator=torch.Generator().manual_seed(t[4]), dtype=torch.float64) + 0.01)


def test_spoc_mac_hand_values():
    assert spoc(HAND).tolist() == [[1.0, 0.5]]
    assert mac(HAND).tolist() == [[3.0, 2.0]]


def test_gem_hand_value():
    # channel 0: ((1^3 + 3^3 + 2 eps^3) / 4)^(1/3) with eps negligible
    got = gem(HAND.double(), 3.0, eps=1e-12)
    assert got[0, 0].item() == pytest.approx((28 / 4) ** (1 / 3), rel=1e-9)
    assert got[0, 1].item() == pytest.approx((8 / 4) ** (1 / 3), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(maps())
def test_gem_p1_is_spoc_and_between_spoc_and_mac(x):
    torch.testing.assert_close(gem(x, 1.0, eps=1e-9), spoc(x))
    g = gem(x, 3.0, eps=1e-9)
    assert torch.all(g >= spoc(x) - 1e-9) and torch.all(g <= mac(x) + 1e-9)  # power-mean inequality
    assert torch.all(gem(x, 6.0, eps=1e-9) >= g - 1e-9)  # monotone in p


@settings(max_examples=25, deadline=None)
@given(maps(min_side=2))
def test_gem_tends_to_mac(x):
    hw = x.shape[-1] * x.shape[-2]
    p = 400.0
    # (1/n Σ x^p)^(1/p) >= max * n^(-1/p): the gap closes as p grows
    got = gem(x, p, eps=1e-9)
    assert torch.all(got <= mac(x) + 1e-9)
    assert torch.all(got >= mac(x) * hw ** (-1 / p) - 1e-9)


def test_gem_per_channel_p():
    x = torch.rand(2, 3, 4, 5) + 0.1
    p = torch.tensor([1.0, 3.0, 5.0])
    got = gem(x, p)
    for c in range(3):
        torch.testing.assert_close(got[:, c], gem(x[:, c:c + 1], float(p[c]))[:, 0])
    mod = GeM(p=3.0, channels=3)
    assert mod.p.shape == (3,) and mod.p.requires_grad
    mod(x).sum().backward()
    assert mod.p.grad is not None and torch.all(mod.p.grad != 0)
    torch.testing.assert_close(GeM(p=3.0, channels=3)(x), GeM(p=3.0)(x))


def test_rmac_regions_hand_layout():
    # 10x20 map: level 1 side 10; m=2 gives 50% overlap (m=1: 0%, m=3: 67%), closest to 40%
    regions = rmac_regions(10, 20, levels=2)
    level1 = [(0, 0, 10, 10), (0, 5, 10, 10), (0, 10, 10, 10)]
    assert regions[:3] == level1
    # level l has l x (l+m-1) regions with m = 3 level-1 regions: level 2 -> 2 x 4 of side round(20/3) = 7,
    # tops linspace(0, 3, 2), lefts linspace(0, 13, 4) = 0, 4.33, 8.67, 13
    tops, lefts = {r[0] for r in regions[3:]}, sorted({r[1] for r in regions[3:]})
    assert len(regions) == 3 + 8 and tops == {0, 3} and lefts == [0, 4, 9, 13]
    assert all(r[2] == r[3] == 7 for r in regions[3:])
    # tall map: the same layout transposed
    assert rmac_regions(20, 10, levels=2) == [(l, t, h, w) for t, l, h, w in regions]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 4))
def test_rmac_regions_inside_and_counted(h, w, levels):
    regions = rmac_regions(h, w, levels)
    m = len(rmac_regions(h, w, 1))  # level-1 regions: l x (l + m - 1) regions at level l
    assert len(regions) == sum(level * (level + m - 1) for level in range(1, levels + 1))
    assert regions[0][2] == min(h, w)  # level 1: the largest square
    for top, left, rh, rw in regions:
        assert 0 <= top and 0 <= left and top + rh <= h and left + rw <= w and rh >= 1


def test_rmac_one_region_is_mac():
    x = torch.rand(2, 6, 5, 5)
    assert rmac_regions(5, 5, levels=1) == [(0, 0, 5, 5)]
    m = mac(x)
    torch.testing.assert_close(rmac(x, levels=1), m / m.norm(dim=1, keepdim=True))


@settings(max_examples=25, deadline=None)
@given(maps(min_side=3), st.floats(0.1, 10.0))
def test_rmac_scale_invariant(x, c):
    torch.testing.assert_close(rmac(c * x), rmac(x))


def test_regional_with_other_base():
    x = torch.rand(1, 4, 6, 9)
    regions = [(0, 0, 6, 6), (0, 3, 6, 6)]
    expect = sum(spoc(x[..., :, a:a + 6]) / spoc(x[..., :, a:a + 6]).norm() for a in (0, 3))
    torch.testing.assert_close(regional(x, regions, spoc), expect)
    mod = build_pooling("regional", base="gem", p=2.0, levels=2)
    assert mod(x).shape == (1, 4) and mod.params()["base"] == "gem"


def test_crow_hand_made_map():
    eps = 1e-6
    # S = Σ_c X = [[1,0],[2,3]];  S' = sqrt(S / sqrt(1+4+9))
    s = [[1.0, 0.0], [2.0, 3.0]]
    norm = math.sqrt(1 + 4 + 9)
    s_w = [[math.sqrt(v / norm) for v in row] for row in s]
    torch.testing.assert_close(crow_spatial_weights(HAND.double())[0], torch.tensor(s_w, dtype=torch.float64))
    # Q = fraction non-zero: 2/4 and 1/4;  Ω_k = log((K eps + ΣQ) / (eps + Q_k)), K = 2
    q = [0.5, 0.25]
    omega = [math.log((2 * eps + 0.75) / (eps + qk)) for qk in q]
    torch.testing.assert_close(crow_channel_weights(HAND.double(), eps)[0], torch.tensor(omega, dtype=torch.float64))
    f0 = omega[0] * (s_w[0][0] * 1 + s_w[1][1] * 3)
    f1 = omega[1] * (s_w[1][0] * 2)
    torch.testing.assert_close(crow(HAND.double())[0], torch.tensor([f0, f1], dtype=torch.float64))


def test_bow_hard_and_soft_hand_values():
    # 1x3 map of 2-D local features: directions (1,0), (0,1), (2,0.1)
    x = torch.tensor([[[[1.0, 0.0, 2.0]], [[0.0, 1.0, 0.1]]]])
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(bow_hard(x, codebook), torch.tensor([[2 / 3, 1 / 3, 0.0]]))
    idf = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(bow_hard(x, codebook, idf), torch.tensor([[2 / 3, 2 / 3, 0.0]]))
    soft = bow_soft(x, codebook, temperature=1e-3)
    torch.testing.assert_close(soft, bow_hard(x, codebook), atol=1e-4, rtol=0)
    cb = codebook.clone().requires_grad_(True)
    bow_soft(x, cb, temperature=0.5)[0, 0].backward()
    assert cb.grad is not None and cb.grad.abs().sum() > 0


def test_bow_idf_formula():
    hist = np.array([[1, 0, 2], [0, 0, 1], [3, 0, 1], [1, 0, 0]], dtype=float)
    np.testing.assert_allclose(bow_idf(hist), [math.log(4 / 4), math.log(4 / 1), math.log(4 / 4)], atol=1e-6)


def test_fit_codebook_recovers_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(4, dtype=np.float32)
    pts = np.concatenate([c + 0.01 * rng.standard_normal((50, 4)).astype(np.float32) for c in centres])
    cb = fit_codebook(pts, 4)
    # every true centre has a fitted centroid within 0.05
    dist = np.linalg.norm(cb[:, None] - centres[None], axis=-1)
    assert np.all(dist.min(axis=0) < 0.05)
    with pytest.raises(ValueError, match="at least"):
        fit_codebook(pts[:3], 4)


def test_bow_module_needs_codebook():
    mod = BoW(k=3, channels=2)
    x = torch.rand(1, 2, 2, 2)
    with pytest.raises(RuntimeError, match="codebook"):
        mod(x)
    mod.set_codebook(np.eye(3, 2, dtype=np.float32))
    assert mod(x).shape == (1, 3)
    with pytest.raises(ValueError, match="codebook must be"):
        mod.set_codebook(np.eye(2, 2))


def test_registry():
    assert set(POOLINGS) >= {"spoc", "mac", "gem", "rmac", "regional", "crow", "bow"}
    assert build_pooling("GeM", p=4.0).params() == {"p": 4.0}
    with pytest.raises(ValueError, match="unknown pooling"):
        build_pooling("avgmax")
    with pytest.raises(ValueError, match="bad parameters"):
        build_pooling("mac", p=3)
    x = torch.rand(2, 5, 4, 6)
    for name in ("spoc", "mac", "gem", "rmac", "crow"):
        assert build_pooling(name)(x).shape == (2, 5)


@settings(max_examples=25, deadline=None)
@given(maps(), st.floats(0.1, 10.0))
def test_crow_weights_scale_free(x, c):
    # S' and Ω depend only on the pattern of X, so CroW is homogeneous of degree 1
    torch.testing.assert_close(crow_spatial_weights(c * x), crow_spatial_weights(x))
    torch.testing.assert_close(crow(c * x), c * crow(x))


@settings(max_examples=25, deadline=None)
@given(maps(), st.integers(1, 6), st.integers(0, 1000))
def test_bow_histograms_are_distributions(x, k, seed):
    cb = torch.randn(k, x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    for h in (bow_hard(x, cb), bow_soft(x, cb, temperature=0.3)):
        assert h.shape == (x.shape[0], k) and torch.all(h >= 0)
        torch.testing.assert_close(h.sum(dim=1), torch.ones(x.shape[0], dtype=x.dtype))
