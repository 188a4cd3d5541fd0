"""SfM per cluster through pycolmap (cbir.sfm.reconstruct), on synthetic views with known geometry."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.local.features import LocalFeatures
from cbir.sfm.reconstruct import (MapperSettings, load_cluster_result, reconstruct_cluster, shared_points,
                                  write_database)

W, H, F = 800, 600, 700.0


def _views(n_views: int = 6, n_points: int = 300, seed: int = 0):
    """Points in a box seen by cameras moving sideways and turning a little: (features, matches, visible)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform([-2, -2, 5], [2, 2, 8], (n_points, 3))
    k = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]])
    feats, rows, visible = [], [], []
    for i in range(n_views):
        a = 0.07 * i - 0.18
        r = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        x = (pts - np.array([0.5 * i - 1.25, 0.05 * i, 0.0])) @ r.T
        uv = x @ k.T
        uv = uv[:, :2] / uv[:, 2:]
        vis = (x[:, 2] > 0) & (uv[:, 0] > 1) & (uv[:, 0] < W - 1) & (uv[:, 1] > 1) & (uv[:, 1] < H - 1)
        # drop a few points per view at random so that tracks differ
        vis &= rng.random(n_points) > 0.1
        idx = np.flatnonzero(vis)
        kp = np.zeros((len(idx), 4), np.float32)
        kp[:, :2] = uv[idx] + 0.5 + rng.normal(0, 0.3, (len(idx), 2))
        kp[:, 2] = 2.0
        desc = rng.integers(0, 256, (len(idx), 128), dtype=np.uint8)
        feats.append(LocalFeatures(kp, desc, (W, H)))
        rows.append({int(p): r_ for r_, p in enumerate(idx)})
        visible.append(set(idx.tolist()))
    matches = {}
    for a in range(n_views):
        for b in range(a + 1, n_views):
            common = sorted(visible[a] & visible[b])
            matches[(a, b)] = np.array([(rows[a][p], rows[b][p]) for p in common], dtype=np.int64)
    return feats, matches, visible


def test_database_holds_the_features_and_matches(tmp_path):
    import pycolmap

    feats, matches, _ = _views(3)
    ids = write_database(tmp_path / "db.db", ["a.jpg", "b.jpg", "c.jpg"], feats, matches)
    db = pycolmap.Database.open(str(tmp_path / "db.db"))
    try:
        assert db.num_images() == 3 and db.num_verified_image_pairs() == 3
        np.testing.assert_array_equal(db.read_keypoints(ids[1]), feats[1].keypoints)
        np.testing.assert_array_equal(np.asarray(db.read_descriptors(ids[2]).data), feats[2].descriptors)
        np.testing.assert_array_equal(db.read_two_view_geometry(ids[0], ids[2]).inlier_matches, matches[(0, 2)])
        assert db.read_image(ids[0]).name == "a.jpg"
    finally:
        db.close()


def test_synthetic_views_reconstruct_and_shared_points_match_the_truth(tmp_path):
    feats, matches, visible = _views()
    images = [10, 11, 12, 13, 14, 15]  # the cluster's photo indices in the collection
    settings = MapperSettings(min_model_images=3, seed=0)
    res = reconstruct_cluster(tmp_path / "c0", 0, images, [f"v{i}.jpg" for i in range(6)], feats, matches, settings)
    assert len(res.models) == 1
    model = res.models[0]
    assert model["images"] == images and model["points"] > 250 and model["reprojection_error"] < 1.0
    shared = {(int(a), int(b)): int(c) for a, b, c in res.shared}
    assert set(shared) == {(a, b) for a in images for b in images if a < b}
    for (a, b), s in shared.items():
        truth = len(visible[a - 10] & visible[b - 10])  # 3D points both views see
        assert 0.9 * truth <= s <= truth, (a, b, s, truth)
    # written atomically, read back the same; the same cluster mapped again gives the same result
    back = load_cluster_result(tmp_path / "c0")
    assert back.models == res.models and np.array_equal(back.shared, res.shared)
    again = reconstruct_cluster(tmp_path / "c1", 0, images, [f"v{i}.jpg" for i in range(6)], feats, matches, settings)
    assert again.models == res.models and np.array_equal(again.shared, res.shared)
    assert (tmp_path / "c0" / "database.db").is_file() and (tmp_path / "c0" / "models" / "0").is_dir()


def test_views_without_geometry_give_no_model(tmp_path):
    # matches between unrelated random keypoints: nothing reconstructs, and that is not an error
    rng = np.random.default_rng(3)
    feats = [LocalFeatures(np.c_[rng.uniform(0, 500, (200, 2)), np.ones((200, 2))].astype(np.float32),
                           rng.integers(0, 256, (200, 128), dtype=np.uint8), (500, 500)) for _ in range(3)]
    pairs = {(a, b): np.c_[np.arange(40), rng.permutation(200)[:40]] for a in range(3) for b in range(a + 1, 3)}
    res = reconstruct_cluster(tmp_path / "c", 4, [0, 1, 2], ["a", "b", "c"], feats, pairs, MapperSettings())
    assert res.models == [] and res.shared.shape == (0, 3)
    assert load_cluster_result(tmp_path / "c").cluster == 4


def test_shared_points_counts_pairs_in_tracks():
    class E:
        def __init__(self, i):
            self.image_id = i

    class P:
        def __init__(self, ids):
            self.track = type("T", (), {"elements": [E(i) for i in ids]})()

    rec = type("R", (), {"points3D": {1: P([1, 2, 3]), 2: P([2, 3]), 3: P([3, 1, 1])}})()
    assert shared_points(rec, {1: 7, 2: 8, 3: 9}) == {(7, 8): 1, (7, 9): 2, (8, 9): 2}


def test_a_damaged_result_is_refused(tmp_path):
    from cbir.fileio import FormatError

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.json").write_text('{"format": "cbir-mine-cluster", "format_version": 1}')
    with pytest.raises(FormatError, match="bad mined cluster result"):
        load_cluster_result(tmp_path / "c")
    assert load_cluster_result(tmp_path / "missing") is None
