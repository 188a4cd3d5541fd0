"""The index: exact search against numpy, faiss recall, add/remove/update, persistence, damage, compatibility."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbir.fileio import FormatError
from cbir.index import Index, IncompatibleDescriptorError, exact_topk
from cbir.index.backends import refine_exact
from cbir.index.exact import database_tensor
from cbir.index.store import VectorStore

import torch


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around random cluster centres (ANN recall is meaningless on uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return unit(x)


SETTINGS = {"model": "efficientnet_lite0", "pooling": "gem", "whitening": None}


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), nq=st.integers(1, 7), k=st.integers(1, 70), seed=st.integers(0, 10_000),
       budget=st.sampled_from([1, 50, 1 << 25]))
def test_exact_topk_is_the_sorted_matrix_product(n, nq, k, seed, budget):
    rng = np.random.default_rng(seed)
    x, q = rng.standard_normal((n, 8)).astype(np.float32), rng.standard_normal((nq, 8)).astype(np.float32)
    scores, rows = exact_topk(q, database_tensor(x, torch.device("cpu")), k, max_scores=budget)
    full = q @ x.T
    kk = min(k, n)
    assert scores.shape == rows.shape == (nq, kk)
    np.testing.assert_allclose(scores, np.take_along_axis(full, rows, axis=1), rtol=1e-5, atol=1e-5)
    want = -np.sort(-full, axis=1)[:, :kk]  # the k largest values, best first
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)


def test_exact_index_search_hand_computed():
    # 2-d unit vectors at angles 0, 60, 90, 180 degrees; query at 0 degrees: cosines 1, 0.5, 0, -1.
    a = np.deg2rad([0, 60, 90, 180])
    x = np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)
    idx = Index(2, "exact", device="cpu")
    ids = idx.add(x, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert ids.tolist() == [0, 1, 2, 3]
    hits = idx.search(np.array([1.0, 0.0]), k=3)[0]
    assert [h.path for h in hits] == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_allclose([h.score for h in hits], [1.0, 0.5, 0.0], atol=1e-6)
    # more results asked than images: all of them, still best first
    assert [h.id for h in idx.search(np.array([-1.0, 0.0]), k=10)[0]] == [3, 2, 1, 0]
    assert [h.id for h in idx.search(np.array([1.0, 0.0]), k=2, exclude=[0])[0]] == [1, 2]


@pytest.mark.parametrize("kind,params", [("exact", {}), ("ivfpq", {"nlist": 16, "m": 8, "nprobe": 16, "refine": 4}),
                                         ("hnsw", {"M": 16, "efSearch": 64})])
def test_add_remove_update_by_id(kind, params):
    x = clustered(600, 32, 12, seed=1)
    idx = Index(32, kind, params, device="cpu")
    ids = idx.add(x, [f"/photos/{i}.jpg" for i in range(600)])
    top = idx.search(x[5], 1)[0][0]
    assert top.id == ids[5] and top.path == "/photos/5.jpg" and top.score == pytest.approx(1.0, abs=1e-3)
    idx.remove([ids[5], ids[7]])
    assert len(idx) == 598
    returned = {h.id for h in idx.search(x[[5, 7]], 50)[0] + idx.search(x[[5, 7]], 50)[1]}
    assert not returned & {int(ids[5]), int(ids[7])}
    with pytest.raises(KeyError, match="999999"):
        idx.remove([ids[1], 999999])
    assert len(idx) == 598  # nothing removed by the failed call
    # update: image 3 now carries image 100's descriptor, keeps its id; its old descriptor no longer finds it
    idx.update(int(ids[3]), x[100], path="/photos/3-edited.jpg")
    hits = idx.search(x[100], 2)[0]
    assert {h.id for h in hits} == {int(ids[3]), int(ids[100])}
    assert idx.get(int(ids[3])).path == "/photos/3-edited.jpg" and idx.get(int(ids[3])).updated is not None
    # new ids are never reused after removals
    new = idx.add(x[:1] * 0 + x[5], ["/photos/5-again.jpg"])
    assert int(new[0]) == 600
    with pytest.raises(ValueError, match="already"):
        idx.add(x[:1], ["/photos/0.jpg"])
    assert len(idx) == 599


@pytest.mark.parametrize("kind,params,floor", [("ivfpq", {"nlist": 64, "m": 16, "nprobe": 16, "refine": 8}, 0.9),
                                               ("hnsw", {"M": 16, "efConstruction": 80, "efSearch": 64}, 0.9)])
def test_approximate_recall_against_exact(kind, params, floor):
    data = clustered(6050, 64, 60, seed=2)  # queries from the same clusters as the database
    x, q = data[:6000], data[6000:]
    exact, approx = Index(64, "exact", device="cpu"), Index(64, kind, params, device="cpu")
    paths = [str(i) for i in range(len(x))]
    exact.add(x, paths)
    approx.add(x, paths)
    _, want = exact.search_vectors(q, 10)
    _, got = approx.search_vectors(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got)])
    assert recall >= floor, recall


def test_refine_exact_rescoring():
    x = unit(np.random.default_rng(4).standard_normal((20, 6)))
    store = VectorStore(6, np.arange(100, 120), x)
    q = x[[3]]
    cand = np.array([[107, 103, 111, -1]])
    scores, ids = refine_exact(store, q, cand, 2)
    assert ids[0, 0] == 103 and scores[0, 0] == pytest.approx(1.0, abs=1e-6)
    others = {107: float(q[0] @ x[7]), 111: float(q[0] @ x[11])}
    best = max(others, key=others.get)
    assert ids[0, 1] == best and scores[0, 1] == pytest.approx(others[best], abs=1e-6)


def test_ivfpq_needs_enough_images_to_train():
    idx = Index(32, "ivfpq", {"nlist": 64, "m": 8}, device="cpu")
    idx.add(clustered(100, 32, 4), [str(i) for i in range(100)])
    with pytest.raises(ValueError, match="needs at least 256 images"):
        idx.search_vectors(clustered(1, 32, 4), 5)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        Index(8, "annoy")
    with pytest.raises(ValueError, match="no parameter 'efSearch'"):
        Index(8, "ivfpq", {"efSearch": 3})
    with pytest.raises(ValueError, match="multiple of m=64"):
        Index(100, "ivfpq", {"m": 64})


@pytest.mark.parametrize("kind,params", [("exact", {}), ("ivfpq", {"nlist": 8, "m": 4, "nprobe": 8}), ("hnsw", {})])
def test_save_load_round_trip(tmp_path, kind, params):
    x = clustered(400, 16, 8, seed=5)
    idx = Index(16, kind, params, settings=dict(SETTINGS, imsize=512, scales=[1.0]), device="cpu")
    idx.add(x, [f"/p/{i}.jpg" for i in range(400)], sizes=[(640, 480)] * 400)
    idx.remove([10, 11])
    idx.set_search_params(**({"nprobe": 4} if kind == "ivfpq" else {}))
    before = idx.search_vectors(x[:20], 7)
    idx.save(tmp_path / "ix")
    back = Index.load(tmp_path / "ix", device="cpu")
    assert (back.kind, len(back), back.dim) == (kind, 398, 16)
    assert back.settings == dict(SETTINGS, imsize=512, scales=[1.0], dim=16)
    assert back.params == idx.params
    after = back.search_vectors(x[:20], 7)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], atol=1e-6)
    rec = back.get(12)
    assert (rec.path, rec.width, rec.height) == ("/p/12.jpg", 640, 480) and rec.added == idx.get(12).added
    # ids keep counting after a reload
    assert back.add(x[:1], ["/p/new.jpg"]).tolist() == [400]
    # saving again replaces the generation and leaves one
    back.save(tmp_path / "ix")
    gens = [p.name for p in (tmp_path / "ix").iterdir() if p.is_dir()]
    assert len(gens) == 1 and len(Index.load(tmp_path / "ix")) == 399


def _saved(tmp_path, n=50):
    idx = Index(8, "exact", settings=SETTINGS, device="cpu")
    idx.add(clustered(n, 8, 3), [f"{i}.jpg" for i in range(n)])
    return idx, idx.save(tmp_path / "ix")


def _gen(root):
    return root / json.loads((root / "manifest.json").read_text())["generation"]


def test_damaged_files_give_format_errors(tmp_path):
    _, root = _saved(tmp_path)
    vec = _gen(root) / "vectors.npy"
    data = bytearray(vec.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern inside the float data: same size, wrong checksum
    vec.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        Index.load(root)
    vec.write_bytes(bytes(data[:100]))
    with pytest.raises(FormatError, match="truncated"):
        Index.load(root)


def test_missing_generation_is_a_format_error(tmp_path):
    _, root = _saved(tmp_path)
    (_gen(root) / "ids.npy").unlink()
    with pytest.raises(FormatError, match="incomplete: index file missing"):
        Index.load(root)


def test_damaged_sqlite_without_checksum_check(tmp_path):
    _, root = _saved(tmp_path)
    db = _gen(root) / "meta.sqlite"
    db.write_bytes(b"\0" * db.stat().st_size)
    with pytest.raises(FormatError, match="checksum"):
        Index.load(root)
    with pytest.raises(FormatError, match="meta.sqlite"):
        Index.load(root, verify=False)


def test_wrong_or_missing_manifest(tmp_path):
    _, root = _saved(tmp_path)
    man = root / "manifest.json"
    good = json.loads(man.read_text())
    man.write_text("{not json")
    with pytest.raises(FormatError, match="not JSON"):
        Index.load(root)
    man.write_text(json.dumps(dict(good, format_version=99)))
    with pytest.raises(FormatError, match="version 99"):
        Index.load(root)
    man.write_text(json.dumps(dict(good, format="descriptors")))
    with pytest.raises(FormatError, match="not a cbir cbir-index"):
        Index.load(root)
    man.write_text(json.dumps({k: v for k, v in good.items() if k != "files"}))
    with pytest.raises(FormatError, match=r"manifest.json: files: is missing$"):
        Index.load(root)
    man.unlink()
    with pytest.raises(FileNotFoundError, match="index manifest not found"):
        Index.load(root)
    with pytest.raises(FileNotFoundError, match="index not found"):
        Index.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FormatError, match="not an index folder"):
        Index.load(tmp_path / "file")


def test_failed_save_leaves_previous_index(tmp_path, monkeypatch):
    idx, root = _saved(tmp_path)
    idx.add(clustered(5, 8, 3, seed=9), [f"new{i}.jpg" for i in range(5)])
    from cbir.index import store

    def boom(self, file):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(store.MetadataDB, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        idx.save(root)
    assert len(Index.load(root)) == 50
    assert sorted(p.name for p in root.iterdir()) == sorted(["manifest.json", _gen(root).name])


def test_query_made_differently_is_refused():
    idx = Index(8, "exact", settings=SETTINGS, device="cpu")
    idx.add(clustered(10, 8, 2), [str(i) for i in range(10)])
    q = clustered(1, 8, 2, seed=3)
    assert idx.search(q, 3, settings={"model": "efficientnet_lite0", "pooling": "gem", "dim": 8})
    with pytest.raises(IncompatibleDescriptorError, match="pooling: index='gem', query='mac'"):
        idx.search(q, 3, settings={"model": "efficientnet_lite0", "pooling": "mac"})
    with pytest.raises(IncompatibleDescriptorError, match="whitening"):
        idx.search(q, 3, settings={"whitening": "pca 512"})
    with pytest.raises(IncompatibleDescriptorError, match="dimension 16 but the index holds 8-d"):
        idx.search(np.ones(16), 3)
    with pytest.raises(IncompatibleDescriptorError, match="model"):
        idx.add(q, ["x.jpg"], settings={"model": "resnet101"})
    with pytest.raises(ValueError, match="NaN"):
        idx.search(np.full(8, np.nan), 3)


def test_concurrent_searches_and_changes():
    x = clustered(2000, 32, 20, seed=6)
    idx = Index(32, "exact", device="cpu")
    idx.add(x[:1000], [str(i) for i in range(1000)])
    errors: list[BaseException] = []

    def searcher():
        try:
            for i in range(60):
                hits = idx.search(x[i], 5)[0]
                assert len(hits) == 5 and all(h.path == str(h.id) for h in hits)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def writer():
        try:
            for start in range(1000, 2000, 100):
                idx.add(x[start:start + 100], [str(i) for i in range(start, start + 100)])
                idx.remove([start])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(4)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(idx) == 2000 - 10


# --- faiss factory strings and recall-target tuning (issue 11.4) -----------------------------------

def test_tuning_reaches_its_recall_target_on_held_out_queries():
    from cbir.index.tuning import exact_ground_truth

    x = clustered(6000 + 400, 32, 60, seed=3, spread=1.0)
    db, tune_q, held_out = x[:6000], x[6000:6200], x[6200:]
    idx = Index(32, "faiss", {"factory": "IVF64_HNSW16,PQ8x4fs,RFlat"})
    idx.add(db, [str(i) for i in range(len(db))])
    k, target = 20, 0.9
    _, before = idx.search_vectors(held_out, k)  # faiss defaults (nprobe=1, no refine factor)
    result = idx.tune(tune_q, target=target, k=k)
    want = idx.store.ids[exact_ground_truth(db, held_out, k)]
    _, got = idx.search_vectors(held_out, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want)])
    recall_before = np.mean([len(set(a) & set(b)) / k for a, b in zip(before, want)])
    assert result.reached and result.recall >= target
    assert recall >= target > recall_before  # the default would not have reached it
    assert idx.params["search"] == result.search and idx.params["tuned"]["target"] == target
    faster = [p for p in result.curve if p[0] >= target + 0.005]
    assert result.ms_per_query == min(p[1] for p in faster)  # the fastest point that reaches it


def test_faiss_factory_index_follows_changes_and_saves_its_tuning(tmp_path):
    x = clustered(3000, 32, 30, seed=4, spread=1.0)
    for factory in ("IVF32,PQ8x4fs", "IVF32_HNSW16,PQ8x4fs,Refine(SQfp16)"):
        idx = Index(32, "faiss", {"factory": factory, "search": "nprobe=32"})  # nprobe = nlist: every list
        ids = idx.add(x[:2500], [str(i) for i in range(2500)])
        idx.search_vectors(x[:1], 1)
        new = idx.add(x[2500:], [str(i) for i in range(2500, 3000)])
        idx.remove(ids[:100])
        _, got = idx.search_vectors(x[[0, 5, 2600]], 5)
        assert not np.isin(got, ids[:100]).any()
        assert got[2, 0] == new[100]  # an added vector finds itself
        idx.set_search_params(nprobe=16)
        idx.save(tmp_path / factory)
        again = Index.load(tmp_path / factory)
        assert again.params["search"] == "nprobe=16" and again.kind == "faiss"
        np.testing.assert_array_equal(again.search_vectors(x[:50], 10)[1], idx.search_vectors(x[:50], 10)[1])
