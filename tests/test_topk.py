"""cbir.topk: chunked top-k = the in-memory ranking (rank_from_scores), ties, k > N, blocks, memmaps;
evaluation from a top-k cut = the full evaluation when every positive is inside the cut."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.descriptors import l2_normalize
from cbir.evaluation import compute_map, evaluate_revisitop, rank_from_scores
from cbir.topk import chunked_topk, keys_to_rows, keys_to_scores, order_keys, release_pages


def _data(nq=9, n=1500, d=24, seed=0):
    """Vectors of multiples of 1/64 in [-1, 1]: every inner product (< 2^17 units of 1/4096) is exact
    in float32 whatever the summation order, so a chunked and an in-memory matrix product give the
    same floats bit for bit (with arbitrary floats, BLAS may round a gemv and a gemm differently in
    the last bit). Such data also has many equal scores."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-64, 65, (nq, d)).astype(np.float32) / 64,
            rng.integers(-64, 65, (n, d)).astype(np.float32) / 64)


@pytest.mark.parametrize("chunk", [1, 7, 256, 1499, 1500, 4096])
@pytest.mark.parametrize("k", [1, 10, 333])
def test_chunked_equals_in_memory_ranking(chunk, k):
    q, db = _data()
    full = q @ db.T
    scores, rows = chunked_topk(q, db, k, chunk_rows=chunk)
    want = rank_from_scores(full, top_k=k)
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_array_equal(scores, np.take_along_axis(full, want, axis=1))
    assert rows.dtype == np.int64 and scores.dtype == np.float32


def test_arbitrary_floats_match_up_to_rounding_of_the_product():
    rng = np.random.default_rng(7)
    q, db = l2_normalize(rng.standard_normal((5, 32))), l2_normalize(rng.standard_normal((2000, 32)))
    full = q @ db.T
    for chunk in (1, 100, 2000):
        scores, rows = chunked_topk(q, db, 40, chunk_rows=chunk)
        np.testing.assert_allclose(scores, np.take_along_axis(full, rows, axis=1), atol=1e-6)
        want = rank_from_scores(full, top_k=40)
        # the same rows wherever the full scores are not within rounding of each other
        gap = np.abs(np.diff(np.sort(full, axis=1)[:, ::-1][:, :41], axis=1)).min()
        if gap > 1e-5:
            np.testing.assert_array_equal(rows, want)


def test_ties_by_ascending_row_and_k_larger_than_n():
    # small integers: every product is exact in float32 and many scores are equal
    rng = np.random.default_rng(1)
    q = rng.integers(-2, 3, (6, 3)).astype(np.float32)
    db = rng.integers(-2, 3, (200, 3)).astype(np.float32)
    full = q @ db.T
    assert len(np.unique(full[0])) < 40  # plenty of ties
    for chunk in (1, 3, 64, 200):
        scores, rows = chunked_topk(q, db, 1000, chunk_rows=chunk)
        assert rows.shape == (6, 200)  # k' = min(k, N)
        np.testing.assert_array_equal(rows, np.argsort(-full, axis=1, kind="stable"))
        # hand check of the rule on one row: equal scores appear in ascending row order
        r0, s0 = rows[0], scores[0]
        same = s0[1:] == s0[:-1]
        assert np.all(r0[1:][same] > r0[:-1][same])
        assert np.all(s0[1:] <= s0[:-1])


def test_cut_inside_a_run_of_ties_keeps_the_lowest_rows():
    q = np.ones((1, 2), np.float32)
    db = np.zeros((10, 2), np.float32)
    db[[2, 5, 7, 9]] = 1.0  # four rows tied at score 2, the rest at 0
    for chunk in (1, 2, 3, 10):
        s, r = chunked_topk(q, db, 3, chunk_rows=chunk)
        assert r.tolist() == [[2, 5, 7]] and s.tolist() == [[2.0, 2.0, 2.0]]
        s, r = chunked_topk(q, db, 6, chunk_rows=chunk)
        assert r.tolist() == [[2, 5, 7, 9, 0, 1]]


def test_blocks_iterable_in_any_order_and_memmap(tmp_path):
    q, db = _data(n=1000, seed=2)
    want = rank_from_scores(q @ db.T, top_k=50)
    pieces = [(s, db[s:s + 137]) for s in range(0, 1000, 137)]
    rng = np.random.default_rng(0)
    rng.shuffle(pieces)
    _, rows = chunked_topk(q, iter(pieces), 50)
    np.testing.assert_array_equal(rows, want)
    # a float16 memory-mapped file, read block by block (its pages released after each block)
    np.save(tmp_path / "db.npy", db.astype(np.float16))
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    s16, rows16 = chunked_topk(q, mm, 50, chunk_rows=100)
    full16 = q @ np.asarray(mm, dtype=np.float32).T
    np.testing.assert_array_equal(rows16, rank_from_scores(full16, top_k=50))
    np.testing.assert_array_equal(s16, np.take_along_axis(full16, rows16, axis=1))


def test_release_pages_keeps_the_data_readable(tmp_path):
    x = np.arange(3 * 5000, dtype=np.float32).reshape(5000, 3)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    view = mm[1234:4321]
    before = np.array(view)
    release_pages(view)
    release_pages(mm)
    release_pages(x)  # not a memory map: no-op
    np.testing.assert_array_equal(np.array(view), before)
    np.testing.assert_array_equal(np.asarray(mm), x)


def test_transform_is_applied_per_block():
    rng = np.random.default_rng(3)
    q = l2_normalize(rng.standard_normal((4, 8)))
    raw = rng.standard_normal((300, 8)).astype(np.float32) * 5
    _, rows = chunked_topk(q, raw, 20, chunk_rows=64, transform=l2_normalize)
    np.testing.assert_array_equal(rows, rank_from_scores(q @ l2_normalize(raw).T, top_k=20))


def test_order_keys_round_trip_and_order():
    rng = np.random.default_rng(4)
    s = np.concatenate([rng.standard_normal(500).astype(np.float32) * 10, [0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40]])
    s = s.astype(np.float32)[None, :]
    rows = rng.permutation(s.shape[1]).astype(np.int64)
    keys = order_keys(s, rows)
    np.testing.assert_array_equal(keys_to_rows(keys), rows[None, :])
    np.testing.assert_array_equal(keys_to_scores(keys), s + np.float32(0.0))
    # descending keys == lexicographic (score desc, row asc), -0.0 and 0.0 equal
    order = np.argsort(-keys[0])
    want = np.lexsort((rows, -(s[0] + np.float32(0.0))))
    np.testing.assert_array_equal(order, want)


def test_errors():
    q, db = _data(n=50)
    with pytest.raises(ValueError, match="k must be"):
        chunked_topk(q, db, 0)
    with pytest.raises(ValueError, match="expected"):
        chunked_topk(q, db[:, :5], 3)
    bad = db.copy()
    bad[7, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        chunked_topk(q, bad, 3)
    with pytest.raises(ValueError, match="device"):
        chunked_topk(q, db, 3, device="tpu")
    with pytest.raises(ValueError, match="float16"):
        chunked_topk(q, db, 3, dtype="float16")
    with pytest.raises(ValueError, match="pairs"):
        chunked_topk(q, [db], 3)


# --- evaluation from the top-k cut ------------------------------------------------------------


def _gnd(nq, n, rng, npos=5, njunk=4):
    out = []
    for _ in range(nq):
        idx = rng.choice(n, npos + njunk, replace=False)
        out.append({"easy": idx[:3], "hard": idx[3:npos], "junk": idx[npos:]})
    return out


def test_topk_evaluation_equals_full_when_positives_inside_the_cut():
    rng = np.random.default_rng(5)
    q, db = _data(nq=6, n=3000, d=16, seed=5)
    gnd = _gnd(6, 3000, rng)
    # make every positive/junk image near its query so they all rank inside the cut
    for i, g in enumerate(gnd):
        for j in np.concatenate([g["easy"], g["hard"], g["junk"]]):
            db[j] = 4 * q[i] + rng.integers(-8, 9, 16).astype(np.float32) / 64  # still exact in float32
    full = evaluate_revisitop(q @ db.T, gnd)
    _, rows = chunked_topk(q, db, 100, chunk_rows=512)
    cut = evaluate_revisitop(rows, gnd)
    pos = [np.concatenate([g["easy"], g["hard"]]) for g in gnd]
    assert all(np.isin(p, rows[i]).all() for i, p in enumerate(pos))  # the premise holds
    for proto in ("easy", "medium", "hard"):
        assert cut["mAP"][proto] == pytest.approx(full["mAP"][proto], abs=1e-12)
        for kk in (1, 5, 10):
            assert cut["mP"][proto][kk] == pytest.approx(full["mP"][proto][kk], abs=1e-12)


def test_topk_evaluation_counts_positives_beyond_the_cut_as_missed():
    # one query, positives at (0-based) positions 0 and 4 of the full ranking; cut at K=3
    ranks_full = np.array([[10, 11, 12, 13, 14, 15]])
    gnd = [{"ok": [10, 14], "junk": []}]
    full = compute_map(ranks_full, gnd)
    cut = compute_map(ranks_full[:, :3], gnd)
    # hand computation (trapezoid AP, n_pos = 2): full = ((1 + 1)/2 + (1/4 + 2/5)/2) / 2
    assert full.map == pytest.approx((1.0 + (0.25 + 0.4) / 2) / 2)
    assert cut.map == pytest.approx(1.0 / 2)  # the missed positive adds nothing, n_pos still 2
    assert cut.map < full.map


@pytest.mark.parametrize("chunk", [1, 100, 5000])
def test_torch_path_equals_in_memory_ranking(chunk):
    # the GPU code path (int64 keys + torch.topk), run on the CPU in float32 so that it is tested here
    from cbir.topk import _chunked_topk_torch

    q, db = _data(nq=4, n=700, d=16, seed=8)
    blocks = [(s, db[s:s + 250]) for s in (500, 0, 250)]  # out of order
    for src in (db, blocks):
        scores, rows = _chunked_topk_torch(q, src, 300, chunk, "cpu", "float32", None)
        want = rank_from_scores(q @ db.T, top_k=300)
        np.testing.assert_array_equal(rows, want)
        np.testing.assert_array_equal(scores, np.take_along_axis(q @ db.T, want, axis=1))
    _, rows = _chunked_topk_torch(q, db, 5000, chunk, "cpu", "float32", None)  # k > N
    np.testing.assert_array_equal(rows, np.argsort(-(q @ db.T), axis=1, kind="stable"))


def test_cuda_refused_without_a_gpu():
    import torch

    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("a GPU is present")
    q, db = _data(n=10)
    with pytest.raises(ValueError, match="no GPU"):
        chunked_topk(q, db, 3, device="cuda")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_equals_in_memory_fp16_ranking():  # pragma: no cover - GPU only
    import torch

    # small integers: every fp16 product and sum (|.| <= 576 < 2048) is exact, whatever cuBLAS's order
    rng = np.random.default_rng(6)
    q = rng.integers(-3, 4, (5, 64)).astype(np.float32)
    db = rng.integers(-3, 4, (5000, 64)).astype(np.float32)
    scores, rows = chunked_topk(q, db, 100, chunk_rows=999, device="cuda")
    full = (torch.from_numpy(q).cuda().half() @ torch.from_numpy(db).cuda().half().T).float().cpu().numpy()
    np.testing.assert_array_equal(rows, rank_from_scores(full, top_k=100))
    np.testing.assert_array_equal(scores, np.take_along_axis(full, rows, axis=1))


def test_objects_with_iter_chunks_and_descriptors(tmp_path):
    from cbir.descriptors import Descriptors

    q, db = _data(n=900, seed=9)
    want = rank_from_scores(q @ db.T, top_k=30)

    class Sharded:  # the interface of a sharded descriptor store: iter_chunks(rows) -> (start, block)
        dim = db.shape[1]

        def __init__(self):
            self.asked = []

        def iter_chunks(self, rows):
            self.asked.append(rows)
            for s in range(0, 900, 400):  # its own shard size, whatever was asked
                yield s, db[s:s + 400]

    sh = Sharded()
    _, rows = chunked_topk(q, sh, 30, chunk_rows=128)
    np.testing.assert_array_equal(rows, want)
    assert sh.asked == [128]
    Descriptors(ids=[str(i) for i in range(900)], vectors=db).save(tmp_path / "d")
    _, rows = chunked_topk(q, Descriptors.load(tmp_path / "d", mmap=True), 30, chunk_rows=100)
    np.testing.assert_array_equal(rows, want)


def test_sharded_descriptor_folder(tmp_path):
    from cbir.descriptors import Descriptors

    q, db = _data(n=2500, seed=10)
    Descriptors(ids=[str(i) for i in range(2500)], vectors=db.astype(np.float16)).save(tmp_path / "s", shard_size=600)
    store = Descriptors.load(tmp_path / "s", mmap=True)
    want = rank_from_scores(q @ db.astype(np.float16).astype(np.float32).T, top_k=40)
    for src in (store, store.vectors):
        _, rows = chunked_topk(q, src, 40, chunk_rows=256)
        np.testing.assert_array_equal(rows, want)
