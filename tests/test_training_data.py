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
