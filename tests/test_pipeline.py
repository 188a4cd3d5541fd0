"""cbir.pipeline: benchmark loading, description with a cache, scoring with one Rerank object."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from cbir import pipeline
from cbir.pipeline import describing
from cbir.descriptors import Descriptors
from cbir.evaluation import evaluate_revisitop
from cbir.model import ModelSpec, build_model
from cbir.rerank import Rerank
from conftest import toy_benchmark


def test_load_benchmark_sources(tmp_path):
    gpath = toy_benchmark(tmp_path)
    b = pipeline.load_benchmark(gpath)
    assert b.protocol == "revisitop" and b.db_ids == ["a", "b", "c"] and b.query_bboxes == [(0, 0, 20, 20)]
    assert pipeline.load_benchmark("demo").name == "demo"
    moved = pipeline.load_benchmark(dataset="demo", images=tmp_path)
    assert all(str(p).startswith(str(tmp_path)) for p in moved.db_paths)
    # a labelled folder: one sub-folder per class
    for cls in ("x", "y"):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "lab" / cls / f"{i}.jpg")
    lab = pipeline.load_benchmark(tmp_path / "lab", n_queries=2)
    assert lab.protocol == "labels" and len(lab.db_ids) == 4
    with pytest.raises(FileNotFoundError, match="nope"):
        pipeline.load_benchmark(tmp_path / "nope.pkl")
    with pytest.raises(ValueError):
        pipeline.load_benchmark()


def test_score_matches_the_protocol_and_records_rerank(tmp_path):
    bench = pipeline.load_benchmark(toy_benchmark(tmp_path))
    q = np.array([[1, 0, 0]], np.float32)
    db = np.array([[0.9, 0.1, 0], [0.7, 0.7, 0], [0.5, 0.2, 0.8]], np.float32)
    res = pipeline.score(bench, q, db)
    from cbir.descriptors import l2_normalize

    ref = evaluate_revisitop(l2_normalize(q) @ l2_normalize(db).T, bench.gnd)
    assert res["mAP"] == pytest.approx(ref["mAP"]) and res["applied"] == {}
    res = pipeline.score(bench, q, db, Rerank(qe=1), keep_scores=True)
    assert res["applied"]["qe"]["k"] == 1 and res["scores"].shape == (1, 3)
    # a distractor equal to the query comes first: Easy (ok {a}, junk {b, c}) ranks d, a; the
    # revisitop AP (trapezoid) of one positive at 0-based rank 1 is (0/1 + 1/2) / 2 = 1/4
    dis = Descriptors(ids=["d"], vectors=np.array([[1, 0, 0]], np.float32))
    res = pipeline.score(bench, q, db, distractors=dis)
    assert res["n_distractors"] == 1 and res["mAP"]["easy"] == pytest.approx(25.0)


def test_describe_uses_the_cache(tmp_path, monkeypatch):
    """Second describe with the same settings runs no extraction and gives the same vectors;
    another setting is a miss for every image, an edited image a miss for that image alone."""
    from cbir.cache import describe as cached

    bench = pipeline.load_benchmark(toy_benchmark(tmp_path))
    calls = []
    real = cached._run_extract

    def counting(model, paths, **kw):
        calls.append(len(paths))
        return real(model, paths, **kw)

    monkeypatch.setattr(cached, "_run_extract", counting)
    spec = ModelSpec("efficientnet_lite0", "gem:p=4", "none")
    kw = dict(imsize=32, scales=(1.0,), device="cpu", cache_dir=tmp_path / "cache")
    q1, db1 = pipeline.describe(bench, spec, **kw)
    assert calls == [4] and q1.meta["cache"] == "miss" and q1.meta["pooling_params"]["p"] == pytest.approx(4)
    assert q1.meta["described"] == 4 and q1.meta["cache_hits"] == 0
    q2, db2 = pipeline.describe(bench, spec, **kw)
    assert calls == [4] and q2.meta["cache"] == "hit" and q2.meta["cache_hits"] == 4
    assert q2.meta["pooling_params"] == q1.meta["pooling_params"] and q2.meta["model"] == "efficientnet_lite0"
    np.testing.assert_array_equal(q1.vectors, q2.vectors)
    np.testing.assert_array_equal(db1.vectors, db2.vectors)
    pipeline.describe(bench, spec, **{**kw, "imsize": 24})
    assert calls == [4, 4]
    Image.new("RGB", (40, 30), (0, 0, 0)).save(bench.db_paths[2])  # an edited image: described again, alone
    q3, db3 = pipeline.describe(bench, spec, **kw)
    assert calls == [4, 4, 1] and q3.meta["cache"] == "miss"
    np.testing.assert_array_equal(db3.vectors[:2], db1.vectors[:2])
    assert not np.allclose(db3.vectors[2], db1.vectors[2])


def test_describe_an_in_memory_net_is_not_cached_and_crops(tmp_path, monkeypatch):
    bench = pipeline.load_benchmark(toy_benchmark(tmp_path))
    net = build_model("efficientnet_lite0", pooling="gem", weights="none")
    q, db = pipeline.describe(bench, net, imsize=32, scales=(1.0,), device="cpu", cache_dir=tmp_path / "c")
    assert q.meta["cache"] is None and not (tmp_path / "c").exists()
    assert q.ids == ["q"] and db.ids == ["a", "b", "c"] and q.meta["cropped_queries"] is True
    from cbir.extract import extract

    crop = extract(net, [bench.query_paths[0]], bboxes=[(0, 0, 20, 20)], imsize=32, scales=(1.0,), device="cpu",
                   progress=False)
    np.testing.assert_allclose(q.vectors, crop.vectors, atol=1e-5)


def test_evaluate_from_features_equals_score(tmp_path):
    gpath = toy_benchmark(tmp_path)
    vec = {"q": [1, 0, 0], "a": [0.9, 0.1, 0], "b": [0.7, 0.7, 0], "c": [0.5, 0.2, 0.8]}
    Descriptors(ids=list(vec), vectors=np.array(list(vec.values()), np.float32)).save(tmp_path / "f")
    res = pipeline.evaluate(gpath, features=tmp_path / "f", rerank=Rerank(qe=1))
    assert res["mAP"]["medium"] == pytest.approx(100.0) and res["applied"]["qe"]["k"] == 1
    assert res["n_db"] == 3 and res["protocol"] == "revisitop"
    with pytest.raises(KeyError, match="'c'"):
        Descriptors(ids=["a", "b", "q"], vectors=np.eye(3, dtype=np.float32)).save(tmp_path / "few")
        pipeline.evaluate(gpath, features=tmp_path / "few")
    with pytest.raises(ValueError):
        pipeline.evaluate(gpath)


def test_distractors_with_top_k_scan_in_blocks_and_agree_with_the_full_matrix(tmp_path):
    """+distractors with top_k: the block scan (cbir.topk) gives the figures of the stacked matrix."""
    bench = pipeline.load_benchmark(toy_benchmark(tmp_path))
    rng = np.random.default_rng(0)
    q = np.array([[1, 0, 0]], np.float32)
    db = np.array([[0.9, 0.1, 0], [0.7, 0.7, 0], [0.5, 0.2, 0.8]], np.float32)
    Descriptors(ids=[f"d{i}" for i in range(500)],
                vectors=rng.normal(size=(500, 3)).astype(np.float16)).save(tmp_path / "dis")
    for k in (2, 50, 503):
        blocks = pipeline.score(bench, q, db, distractors=tmp_path / "dis", top_k=k)
        full = pipeline.score(bench, q, db, distractors=tmp_path / "dis", top_k=k, keep_scores=True)
        assert blocks["n_distractors"] == 500 and blocks["mAP"] == pytest.approx(full["mAP"])
        for proto in blocks["mP"]:
            assert blocks["mP"][proto] == pytest.approx(full["mP"][proto])
    assert 0 < blocks["mAP"]["medium"] < 100  # the distractors really compete


def test_describe_poolings_matches_the_extractor(tmp_path):
    """One backbone pass, several poolings: each equals describing with that pooling (up to the
    float16 storage of the feature maps)."""
    from cbir.pooling import build_pooling

    import torch

    bench = pipeline.load_benchmark(toy_benchmark(tmp_path))
    torch.manual_seed(0)  # random weights: the same ones in both builds
    out = pipeline.describe_poolings(bench, "efficientnet_lite0", {"gem": build_pooling("gem"), "mac": build_pooling("mac")},
                                     imsize=48, scale_sets={"one": (1.0,), "two": (1.0, 0.5)}, weights="none")
    for name in ("gem", "mac"):
        for label, scales in (("one", (1.0,)), ("two", (1.0, 0.5))):
            torch.manual_seed(0)
            net = build_model("efficientnet_lite0", pooling=name, weights="none")
            q, db = pipeline.describe(bench, net, imsize=48, scales=scales, device="cpu", precision="fp32")
            qp, dbp = out[name][label]
            assert qp.ids == q.ids and dbp.ids == db.ids
            cos = np.sum(dbp.vectors * db.vectors, axis=1)
            assert np.all(cos > 0.999), (name, label, cos)
            assert np.sum(qp.vectors * q.vectors) > 0.999


# --- +distractors with a top-K cut: the chunked path (cbir.topk) ------------------------------


def _fc7_bench(oxford_fc7, tmp_path, n_dis=6000, seed=0):
    """rOxford with the real fc7-128d descriptors, plus synthetic distractors saved as float16."""
    from cbir.datasets.revisitop import from_gnd_file
    from cbir.descriptors import l2_normalize

    from conftest import shared_path

    x, names = oxford_fc7
    gpath = shared_path("data", "revisitop", "gnd_roxford5k.pkl")
    bench = from_gnd_file(gpath)
    row = {n: i for i, n in enumerate(names)}
    q = x[[row[n] for n in bench.query_ids]]
    db = x[[row[n] for n in bench.db_ids]]
    rng = np.random.default_rng(seed)
    mix = db[rng.integers(0, len(db), n_dis)] + 0.5 * db[rng.integers(0, len(db), n_dis)]
    dis = l2_normalize(mix + 0.3 / np.sqrt(128) * rng.standard_normal(mix.shape)).astype(np.float16)
    Descriptors(ids=[f"d{i}" for i in range(n_dis)], vectors=dis).save(tmp_path / "dis")
    return bench, q, db, tmp_path / "dis"


@pytest.mark.shared
@pytest.mark.parametrize("top_k", [100, 1000])
def test_distractors_top_k_chunked_equals_in_memory(oxford_fc7, tmp_path, monkeypatch, top_k):
    bench, q, db, dis = _fc7_bench(oxford_fc7, tmp_path)
    full = pipeline.score(bench, q, db, top_k=top_k, distractors=str(dis), keep_scores=True)  # in memory
    # the chunked path, in small blocks, must not load the distractors as one matrix
    import cbir.topk as topk

    monkeypatch.setattr(topk, "default_chunk_rows", lambda dim, nbytes=0: 512)
    monkeypatch.setattr(pipeline, "with_distractors", lambda *a, **k: pytest.fail("loaded all rows"))
    chunked = pipeline.score(bench, q, db, top_k=top_k, distractors=str(dis))
    assert chunked["n_distractors"] == full["n_distractors"] == 6000
    for proto in ("easy", "medium", "hard"):
        assert chunked["mAP"][proto] == pytest.approx(full["mAP"][proto], abs=1e-9)
        assert chunked["mP"][proto] == pytest.approx(full["mP"][proto], abs=1e-9)
    assert chunked["top_k"] == top_k and chunked["applied"] == {}


@pytest.mark.shared
def test_distractors_top_k_chunked_with_whitening(oxford_fc7, tmp_path):
    from cbir.whitening import learn_pca_whitening

    bench, q, db, dis = _fc7_bench(oxford_fc7, tmp_path, n_dis=3000)
    w = learn_pca_whitening(db, dim=64)
    w.save(tmp_path / "w.npz")
    rr = Rerank(whiten=str(tmp_path / "w.npz"))
    full = pipeline.score(bench, q, db, rr, top_k=500, distractors=str(dis), keep_scores=True)
    chunked = pipeline.score(bench, q, db, rr, top_k=500, distractors=str(dis))
    assert chunked["mAP"] == pytest.approx(full["mAP"], abs=1e-9)
    assert chunked["applied"]["whiten"]["out_dim"] == 64 == full["applied"]["whiten"]["out_dim"]
