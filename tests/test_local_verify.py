"""Matching and geometric verification (cbir.local.matching, cbir.local.verify)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.local.features import LocalFeatures, LocalFeatureSettings, extract_local
from cbir.local.matching import MatchSettings, match, match_many
from cbir.local.verify import VerifySettings, geometric_check, verify, verify_candidates, verify_pairs

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"
SETTINGS = LocalFeatureSettings(max_size=512, max_features=1024)
# image 1 -> image 2: rotation + scale + shear + perspective + shift (maps the photo inside 512 x 384)
H_TRUE = np.array([[0.85, 0.12, 30.0], [-0.08, 0.9, 25.0], [2e-4, 1e-4, 1.0]])


def _warp(im: Image.Image, h: np.ndarray) -> Image.Image:
    """im warped by h (image 1 -> image 2); PIL wants the map from output to input pixels."""
    inv = np.linalg.inv(h)
    inv = inv / inv[2, 2]
    return im.transform(im.size, Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8]), Image.Resampling.BICUBIC)


def _apply(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.c_[pts, np.ones(len(pts))] @ h.T
    return p[:, :2] / p[:, 2:]


@pytest.fixture(scope="module")
def pair() -> tuple[LocalFeatures, LocalFeatures]:
    im = Image.open(DEMO / "paris_louvre_000081.jpg").convert("RGB")
    return extract_local(im, SETTINGS, device="cpu"), extract_local(_warp(im, H_TRUE), SETTINGS, device="cpu")


@pytest.fixture(scope="module")
def demo_feats() -> list[LocalFeatures]:
    names = ["paris_eiffel_000005.jpg", "paris_eiffel_000041.jpg", "paris_moulinrouge_000010.jpg",
             "paris_defense_000015.jpg", "paris_invalides_000017.jpg", "paris_louvre_000018.jpg"]
    return [extract_local(DEMO / n, LocalFeatureSettings(max_size=384, max_features=600), device="cpu")
            for n in names]


def test_known_homography_many_inliers_and_the_right_h(pair):
    a, b = pair
    v = verify(a, b, VerifySettings(model="homography"), device="cpu")
    assert v.model == "homography" and v.inliers == len(v.matches) >= 150
    assert v.inliers >= 0.8 * v.putative
    # inlier correspondences obey the true H (within RANSAC's 4 px)
    err = np.linalg.norm(_apply(H_TRUE, a.xy[v.matches[:, 0]]) - b.xy[v.matches[:, 1]], axis=1)
    assert np.percentile(err, 95) < 4.0
    # the estimated H maps a grid over the photo like the true H, within a few pixels
    w, h = a.size
    grid = np.stack(np.meshgrid(np.linspace(0.1 * w, 0.9 * w, 7), np.linspace(0.1 * h, 0.9 * h, 7)), -1).reshape(-1, 2)
    assert np.abs(_apply(v.H, grid) - _apply(H_TRUE, grid)).max() < 3.0


@pytest.mark.parametrize("model", ["fundamental", "two_view"])
def test_other_models_also_verify_the_warped_pair(pair, model):
    a, b = pair
    v = verify(a, b, VerifySettings(model=model), device="cpu")
    assert v.inliers >= 150 and v.model != "none"


def test_unrelated_photos_verify_with_none(demo_feats):
    eiffel, _, moulin, defense, invalides, louvre = demo_feats
    for x, y in [(eiffel, moulin), (defense, invalides), (louvre, eiffel), (moulin, defense)]:
        for model in ("homography", "fundamental", "two_view"):
            assert verify(x, y, VerifySettings(model=model), device="cpu").inliers < 15


def test_batched_matching_equals_pycolmaps_matcher(demo_feats, pair):
    query = demo_feats[0]
    # a duplicated descriptor in a candidate: a tie at the best, which the ratio test refuses
    dup = LocalFeatures(np.r_[query.keypoints[:50], query.keypoints[:1]],
                        np.r_[query.descriptors[:50], query.descriptors[:1]], query.size)
    cands = list(demo_feats) + [pair[0], dup, LocalFeatures(np.zeros((0, 4), np.float32),
                                                           np.zeros((0, 128), np.uint8), (5, 5))]
    for settings in (MatchSettings(), MatchSettings(cross_check=False), MatchSettings(max_ratio=0.9, max_distance=0.5)):
        ref = [match(query, c, settings, device="cpu") for c in cands]
        for block in (1 << 26, 100_000):  # one block, and many small ones
            got = match_many(query, cands, settings, device="cpu", block_elements=block)
            for r, g in zip(ref, got):
                np.testing.assert_array_equal(r, g)
    assert len(ref[0]) == len(query)  # a photo matches itself feature for feature
    assert len(match_many(query, [dup], device="cpu")[0]) == 49  # the tied feature is refused


def test_verify_candidates_equals_pair_by_pair_and_reads_a_store(tmp_path, demo_feats, pair):
    from cbir.local.store import LocalFeatureStore

    query = pair[0]
    cands = [pair[1]] + list(demo_feats)
    counts, details = verify_candidates(query, cands, details=True, device="cpu")
    assert counts.dtype == np.int64 and counts.shape == (len(cands),)
    assert counts[0] >= 150 and (counts[1:] < 15).all()
    assert [verify(query, c, device="cpu").inliers for c in cands] == counts.tolist()
    assert [d.inliers for d in details] == counts.tolist()
    again = verify_candidates(query, cands, device="cpu")  # seeded RANSAC: the same counts
    np.testing.assert_array_equal(again, counts)

    store = LocalFeatureStore(tmp_path / "s", SETTINGS)
    store.add([("q", query)] + [(f"c{i}", c) for i, c in enumerate(cands)])
    keys = [f"c{i}" for i in range(len(cands))]
    np.testing.assert_array_equal(verify_candidates(store.get("q"), keys, store=store, device="cpu"), counts)
    pairs = [("q", k) for k in keys] + [("c0", "q"), ("c1", "c2")]
    got = verify_pairs(store, pairs, device="cpu", progress=(seen := []).append)
    np.testing.assert_array_equal(got[: len(keys)], counts)
    assert got[-2] >= 150 and got[-1] < 15 and sum(seen) == len(pairs)


def test_few_tentative_matches_are_not_tried(pair):
    a, b = pair
    m = match_many(a, [b], device="cpu")[0]
    v = geometric_check(a, b, m[:10], VerifySettings(min_matches=15))
    assert v.inliers == 0 and v.putative == 10 and v.model == "none"
    v = geometric_check(a, b, m[:10], VerifySettings(min_matches=4))
    assert v.inliers >= 8


def test_threshold_follows_the_extraction_scale(pair):
    """The RANSAC threshold is in pixels of the shrunk image: features mapped back from an image shrunk 3x
    (scale 3) accept 3x larger errors in keypoint units."""
    a, b = pair
    noise = np.random.default_rng(0).normal(0, 5.0, size=b.keypoints[:, :2].shape).astype(np.float32)
    moved = LocalFeatures(np.c_[b.keypoints[:, :2] * 3 + noise, b.keypoints[:, 2:]], b.descriptors, b.size, 1.0)
    big = LocalFeatures(np.c_[a.keypoints[:, :2] * 3, a.keypoints[:, 2:]], a.descriptors, a.size, 1.0)
    h = VerifySettings(model="homography")
    strict = verify(big, moved, h, device="cpu").inliers
    scaled = verify(LocalFeatures(big.keypoints, big.descriptors, big.size, 3.0),
                    LocalFeatures(moved.keypoints, moved.descriptors, moved.size, 3.0), h, device="cpu").inliers
    assert scaled > 1.5 * strict
