"""The verifier of the re-ranking chain (cbir.local.verifier) on real photos and synthetic warped copies:
inlier counts, the query's own photo, each pair verified once, correspondences in both images' pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO, VERIFY_OTHERS, warped_copy

from cbir.local import extract_local
from cbir.local.verifier import SAME_IMAGE, FeatureVerifier, same_features
from cbir.rerank.compose import SAME_IMAGE as CHAIN_SAME_IMAGE

NAME = "paris_louvre_000081"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("verifier")
    src = DEMO / "jpg" / f"{NAME}.jpg"
    m = warped_copy(src, tmp / "warped.jpg")
    feats = {"query": extract_local(src), "warped": extract_local(tmp / "warped.jpg"),
             "same": extract_local(src), "crop": extract_local(src, bbox=(40, 30, 480, 360))}
    for n in VERIFY_OTHERS[:2]:
        feats[n] = extract_local(DEMO / "jpg" / f"{n}.jpg")
    return {"feats": feats, "M": m}


def test_counts_own_photo_and_memo(photos):
    f = photos["feats"]
    rows = ["warped", "same", VERIFY_OTHERS[0], VERIFY_OTHERS[1], "crop"]
    db = {i: f[name] for i, name in enumerate(rows)}
    db[5] = None  # an image without local features (e.g. a distractor)
    v = FeatureVerifier(lambda i: f["query"], db.get, device="cpu", keep=True)
    counts = v(0, np.array([0, 1, 2, 3, 4, 5]))
    assert SAME_IMAGE == CHAIN_SAME_IMAGE == -1
    assert counts[0] >= 100, counts  # a similarity of the same photo: hundreds of inliers
    assert counts[1] == SAME_IMAGE  # identical features: the query itself, not an inlier count
    assert counts[2] < 15 and counts[3] < 15, counts  # other landmarks do not verify
    assert counts[4] >= 100 and counts[4] != SAME_IMAGE  # a crop of the query is another image of it
    assert counts[5] == 0 and v.missing == 1
    assert v.pairs == 4  # the own photo and the missing one are not matched
    again = v(0, np.array([4, 0, 2]))
    assert again.tolist() == [counts[4], counts[0], counts[2]] and v.pairs == 4  # nothing verified twice
    assert v.count(0, 0) == counts[0] and v.count(0, 9) is None
    assert same_features(f["query"], f["same"]) and not same_features(f["query"], f["crop"])


def test_correspondences_follow_the_known_warp(photos):
    """Each inlier pair (x_q, y_q, x_w, y_w) maps by the warp: p_query = M [p_warped, 1], to about a pixel."""
    f, m = photos["feats"], photos["M"]
    v = FeatureVerifier(lambda i: f["query"], {0: f["warped"], 1: f["crop"]}.get, device="cpu", keep=True)
    counts = v(0, [0, 1])
    lines = v.matches(0, 0)
    assert lines.shape == (counts[0], 4) and lines.dtype == np.float32
    pred = np.c_[lines[:, 2:], np.ones(len(lines))] @ m.T
    err = np.linalg.norm(pred - lines[:, :2], axis=1)
    assert np.median(err) < 1.0 and np.percentile(err, 90) < 3.0, (np.median(err), np.percentile(err, 90))
    assert v.size_of(0, 0) == (f["query"].size, f["warped"].size)
    # a crop's keypoints are in the whole image's pixels: its correspondences are the identity
    crop = v.matches(0, 1)
    assert len(crop) == counts[1] and np.percentile(np.abs(crop[:, :2] - crop[:, 2:]), 90) < 1.0
    assert (crop[:, 2] >= 40 - 1).all() and (crop[:, 3] >= 30 - 1).all()  # inside the box
    # the own photo: its "correspondences" are the identity on every keypoint
    own = FeatureVerifier(lambda i: f["query"], {0: f["same"]}.get, device="cpu", keep=True)
    assert own(0, [0]).tolist() == [SAME_IMAGE]
    ident = own.matches(0, 0)
    assert len(ident) == len(f["query"]) and np.array_equal(ident[:, :2], ident[:, 2:])


def test_a_query_without_features_verifies_nothing(photos):
    f = photos["feats"]
    v = FeatureVerifier(lambda i: None, {0: f["warped"]}.get, device="cpu")
    assert v(0, [0]).tolist() == [0] and v.pairs == 0 and v.missing == 1
    stats = v.stats()
    assert set(stats) == {"pairs", "missing", "seconds", "query_seconds", "feature_seconds"}
