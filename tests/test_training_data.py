"""Training data formats (retrieval-SfM-120k pkl, class folders, CSV) and per-epoch tuples."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbir.fileio import FormatError
from cbir.training.data import (
    TupleDataset,
    build_epoch_tuples,
    clean_classes,
    from_labels,
    load_class_csv,
    load_class_folder,
    load_sfm,
    load_training_images,
    square_tensor,
)


def _sfm_db(tmp_path: Path) -> Path:
    db = {
        "train": {
            "cids": ["aa00112233", "bb44556677", "cc8899aabb", "dd00000001", "ee00000002"],
            "cluster": [5, 5, 9, 9, 5],
            "qidxs": [0, 0, 2],
            "pidxs": [1, 4, 3],
        },
        "val": {"cids": ["x"], "cluster": [0], "qidxs": [], "pidxs": []},
    }
    p = tmp_path / "retrieval-SfM-120k.pkl"
    p.write_bytes(pickle.dumps(db))
    return p


def test_sfm_pkl(tmp_path):
    p = _sfm_db(tmp_path)
    d = load_sfm(p, tmp_path / "ims")
    # the published layout: ROOT/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid
    assert d.paths[0] == tmp_path / "ims" / "33" / "22" / "11" / "aa00112233"
    assert d.clusters.tolist() == [5, 5, 9, 9, 5]
    assert d.queries.tolist() == [0, 2]
    assert [x.tolist() for x in d.positives] == [[1, 4], [3]]  # all pidxs paired with a query
    flat = load_sfm(p, tmp_path, layout="flat", ext=".jpg")
    assert flat.paths[1] == tmp_path / "bb44556677.jpg"
    with pytest.raises(FormatError, match="no split 'test'"):
        load_sfm(p, tmp_path, split="test")
    with pytest.raises(ValueError, match="no query"):
        load_sfm(p, tmp_path, split="val")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"train": {"cids": [], "cluster": []}}))
    with pytest.raises(FormatError, match="qidxs"):
        load_sfm(bad, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_sfm(tmp_path / "missing.pkl", tmp_path)


def _image(path: Path, colour, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_class_folder_and_csv(tmp_path):
    for c, n in (("arc", 3), ("tower", 2), ("lonely", 1)):
        for i in range(n):
            _image(tmp_path / "f" / c / f"{i}.jpg", (i * 40, 0, 0))
    (tmp_path / "f" / "arc" / "notes.txt").write_text("not an image")
    d = load_class_folder(tmp_path / "f")
    assert len(d.paths) == 6 and d.class_names == ["arc", "lonely", "tower"]
    # the singleton class gives no query; every other image is a query with its classmates as positives
    assert len(d.queries) == 5
    for q, pos in zip(d.queries, d.positives):
        assert q not in pos and (d.clusters[pos] == d.clusters[q]).all()
        assert len(pos) == (d.clusters == d.clusters[q]).sum() - 1
    assert load_training_images({"kind": "folder", "root": tmp_path / "f"}).paths == d.paths

    csv = tmp_path / "train.csv"
    csv.write_text("Image,Label\nf/arc/0.jpg,1\nf/arc/1.jpg,1\nf/tower/0.jpg,2\n,3\n")
    c = load_class_csv(csv)
    assert c.paths[0] == tmp_path / "f/arc/0.jpg" and len(c.queries) == 2
    # Google-Landmarks-v2 style: id without extension in ROOT/i/d/x/id.jpg
    g = tmp_path / "gld.csv"
    g.write_text("id,url,landmark_id\nabcdef,http://x,7\nabc123,http://y,7\n")
    gd = load_class_csv(g, tmp_path / "gld")
    assert gd.paths[0] == tmp_path / "gld" / "a" / "b" / "c" / "abcdef.jpg"
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("foo,bar\n1,2\n")
    with pytest.raises(FormatError, match="image column"):
        load_class_csv(nohead)
    with pytest.raises(FileNotFoundError):
        load_class_folder(tmp_path / "none")
    with pytest.raises(ValueError, match="unknown data kind"):
        load_training_images({"kind": "zip"})


def _toy(seed=0, n_clusters=6, per=5, d=8):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_clusters), per)
    vecs = rng.normal(size=(len(labels), d))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    data = from_labels([f"img{i}.jpg" for i in range(len(labels))], labels.tolist())
    return data, vecs.astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_epoch_tuples(seed):
    data, vecs = _toy(seed)
    calls = []

    def embed(idx):
        calls.append(np.asarray(idx))
        return vecs[idx]

    rng = np.random.default_rng(seed)
    t = build_epoch_tuples(data, embed, n_queries=12, pool_size=10, n_negatives=4, rng=rng)
    assert t.shape == (12, 6)
    assert len(set(t[:, 0].tolist())) == 12  # queries drawn without replacement
    for q, p, *negs in t:
        c = data.clusters
        assert p != q and c[p] == c[q]
        nc = c[negs].tolist()
        assert len(set(nc)) == len(nc) and c[q] not in nc
    # the hard positive is the candidate least similar to the query
    th = build_epoch_tuples(data, embed, n_queries=5, pool_size=30, n_negatives=2, hard_positives=True, rng=rng)
    for q, p, *_ in th:
        cands = data.positives[int(np.flatnonzero(data.queries == q)[0])]
        assert vecs[p] @ vecs[q] == pytest.approx(min(vecs[cands] @ vecs[q]))
    # k is capped by the number of other clusters
    t3 = build_epoch_tuples(data, embed, n_queries=3, pool_size=30, n_negatives=50, rng=rng)
    assert t3.shape == (3, 2 + 5)


def test_clean_classes_rebuilds_queries():
    data, vecs = _toy(1, n_clusters=3, per=8, d=16)
    # make class 0 tight, then plant one far-away member in it
    vecs[data.clusters == 0] = vecs[0] + 0.05 * np.random.default_rng(0).normal(size=(8, 16))
    vecs[3] = -vecs[0]
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cleaned, keep = clean_classes(data, vecs, k=3.0)
    assert not keep[3] and keep[:3].all() and keep[4:8].all()
    assert len(cleaned.paths) == keep.sum()
    assert Path("img3.jpg") not in cleaned.paths
    assert all(Path(f"img{i}.jpg") not in [cleaned.paths[j] for j in pos] for pos in cleaned.positives for i in [3])
    assert cleaned.class_names == data.class_names


def test_tuple_dataset_and_square_tensor(tmp_path):
    paths = []
    for i, col in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 10, 10)]):
        p = tmp_path / f"{i}.png"
        _image(p, col, size=(50 + i * 10, 30))
        paths.append(p)
    data = from_labels(paths, [0, 0, 1, 2])
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    ds = TupleDataset(data, np.array([[0, 1, 2, 3]]), 24, mean, std)
    x, c = ds[0]
    assert x.shape == (4, 3, 24, 24) and c.tolist() == [0, 0, 1, 2]
    # pure red -> channel 0 = (1 − 0.5)/0.25 = 2, channels 1, 2 = (0 − 0.5)/0.25 = −2
    assert torch.allclose(x[0, :, 5, 5], torch.tensor([2.0, -2.0, -2.0]))
    aug = TupleDataset(data, np.array([[0, 1, 2, 3]]), 24, mean, std, augment=True, seed=3)
    a1, a2 = aug[0][0], aug[0][0]
    assert torch.equal(a1, a2)  # augmentation is seeded: an epoch can be replayed on resume
    im = Image.new("RGB", (7, 3), (0, 0, 0))
    assert square_tensor(im, 5, mean, std).shape == (3, 5, 5)


def _mined_db(tmp_path: Path, evidence: bool = True) -> Path:
    # query 0 has positives 1 (20 inliers), 2 (50), 3 (35, listed twice: the larger values kept),
    # 4 (0 inliers, 40 shared 3D points: a positive from the 3D model only); query 5 has 6
    split = {"cids": [f"p{i}.jpg" for i in range(8)], "cluster": [1, 1, 1, 1, 1, 2, 2, 3],
             "qidxs": [0, 0, 0, 0, 0, 5], "pidxs": [1, 2, 3, 3, 4, 6]}
    if evidence:
        split.update(pinliers=[20, 50, 30, 35, 0, 17], p3d=[0, 12, 60, 9, 40, 0])
    p = tmp_path / ("mined.pkl" if evidence else "old.pkl")
    p.write_bytes(pickle.dumps({"format": "cbir-mined-tuples", "format_version": 1, "train": split}))
    return p


def test_load_sfm_reads_the_evidence_of_mined_tuples(tmp_path):
    d = load_sfm(_mined_db(tmp_path), tmp_path, layout="flat")
    assert d.paths[2] == tmp_path / "p2.jpg"
    assert d.queries.tolist() == [0, 5]
    assert [p.tolist() for p in d.positives] == [[1, 2, 3, 4], [6]]
    # rows follow the sorted positives; 3 listed twice keeps the larger inliers and 3D points
    assert d.evidence[0].tolist() == [[20, 0], [50, 12], [35, 60], [0, 40]]
    assert d.evidence[1].tolist() == [[17, 0]]
    # a subset keeps each kept positive's evidence
    sub = d.subset([0, 3, 4, 5, 6])
    assert [p.tolist() for p in sub.positives] == [[1, 2], [4]]
    assert sub.evidence[0].tolist() == [[35, 60], [0, 40]]
    # files without the evidence (retrieval-SfM-120k itself) still load, with none
    old = load_sfm(_mined_db(tmp_path, evidence=False), tmp_path, layout="flat")
    assert old.evidence is None and [p.tolist() for p in old.positives] == [[1, 2, 3, 4], [6]]


@pytest.mark.parametrize("bad, match", [
    ({"pinliers": [1, 2]}, "without p3d"),
    ({"pinliers": [1, 2], "p3d": [0, 0]}, "one per qidxs"),
    ({"pinliers": [-1], "p3d": [0]}, "non-negative"),
    ({"pinliers": ["x"], "p3d": [0]}, "integer"),
    ({"qidxs": [0], "pidxs": [7]}, "outside the 2 images"),
])
def test_load_sfm_refuses_bad_evidence_in_one_line(tmp_path, bad, match):
    split = {"cids": ["a", "b"], "cluster": [0, 0], "qidxs": [0], "pidxs": [1], **bad}
    if "pinliers" in bad and "p3d" not in bad:
        split.pop("p3d", None)
    p = tmp_path / "bad.pkl"
    p.write_bytes(pickle.dumps({"train": split}))
    with pytest.raises(FormatError, match=match) as err:
        load_sfm(p, tmp_path)
    assert "\n" not in str(err.value)


def _positives_chosen(d, rule: str, k: int = 2, draws: int = 60) -> dict[int, set[int]]:
    vecs = np.eye(8, dtype=np.float32)
    out: dict[int, set[int]] = {0: set(), 5: set()}
    rng = np.random.default_rng(0)
    for _ in range(draws):
        t = build_epoch_tuples(d, lambda idx: vecs[idx], n_queries=2, pool_size=8, n_negatives=1, positive=rule,
                               positive_k=k, rng=rng)
        for q, p, *_ in t:
            out[int(q)].add(int(p))
    return out


def test_positive_rules_by_inliers_hand_checked(tmp_path):
    d = load_sfm(_mined_db(tmp_path), tmp_path, layout="flat")
    # by inliers: 2 (50) > 3 (35) > 1 (20) > 4 (0, 40 shared points)
    assert _positives_chosen(d, "inliers_top1") == {0: {2}, 5: {6}}
    assert _positives_chosen(d, "inliers_topk", k=2) == {0: {2, 3}, 5: {6}}
    assert _positives_chosen(d, "inliers_topk", k=3) == {0: {1, 2, 3}, 5: {6}}
    assert _positives_chosen(d, "random") == {0: {1, 2, 3, 4}, 5: {6}}
    old = load_sfm(_mined_db(tmp_path, evidence=False), tmp_path, layout="flat")
    with pytest.raises(ValueError, match="needs inlier counts"):
        _positives_chosen(old, "inliers_top1", draws=1)
    with pytest.raises(ValueError, match="choose the positive two ways"):
        build_epoch_tuples(d, lambda idx: np.eye(8, dtype=np.float32)[idx], n_queries=1, pool_size=8,
                           n_negatives=1, positive="inliers_top1", hard_positives=True, rng=np.random.default_rng(0))


def test_negatives_of_mined_tuples_one_per_other_cluster(tmp_path):
    # many photos of 4 clusters: the k negatives of a query come from k distinct other clusters
    n = 40
    clusters = np.repeat(np.arange(4), n // 4)
    split = {"cids": [f"p{i}.jpg" for i in range(n)], "cluster": clusters.tolist(),
             "qidxs": [i for i in range(n) if i % 10 == 0], "pidxs": [i + 1 for i in range(n) if i % 10 == 0],
             "pinliers": [30] * 4, "p3d": [0] * 4}
    p = tmp_path / "m.pkl"
    p.write_bytes(pickle.dumps({"train": split}))
    d = load_sfm(p, tmp_path, layout="flat")
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(n, 5)).astype(np.float32)
    t = build_epoch_tuples(d, lambda idx: vecs[idx], n_queries=4, pool_size=40, n_negatives=3,
                           positive="inliers_top1", rng=rng)
    for q, pos, *negs in t:
        assert clusters[pos] == clusters[q] and sorted(clusters[negs].tolist()) == sorted(set(range(4)) - {clusters[q]})
