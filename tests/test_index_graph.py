"""The index's kNN graph (issue 11.5) and re-ranking on stored vectors (issue 10.4)."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.index import Index
from cbir.rerank.diffusion import PAPER, DiffusionParams, knn_graph
from cbir.rerank import Rerank


def clustered(n: int, dim: int, clusters: int, seed: int = 0, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rebuilt(index: Index, k: int, gamma: float = 3.0):
    return knn_graph(index.store.vectors, k=k, gamma=gamma, mutual=True)


def assert_same_graph(a, b) -> None:
    a, b = a.tocsr(), b.tocsr()
    a.sort_indices(); b.sort_indices()
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-7)


def test_stored_graph_equals_rebuilt_graph_after_add_remove_update(tmp_path):
    x = clustered(700, 16, 12, seed=1)
    idx = Index(16)
    idx.add(x[:500], [f"{i}" for i in range(500)])
    idx.build_graph(k=10)
    assert_same_graph(idx.affinity(10, 3.0), rebuilt(idx, 10))
    idx.add(x[500:560], [f"{i}" for i in range(500, 560)])      # new nodes enter old lists
    assert_same_graph(idx.affinity(10, 3.0), rebuilt(idx, 10))
    idx.remove(list(range(0, 500, 7)))                           # lists that held them are searched again
    assert_same_graph(idx.affinity(10, 3.0), rebuilt(idx, 10))
    idx.update(3, clustered(1, 16, 12, seed=9)[0])                # remove + add of one id
    assert_same_graph(idx.affinity(10, 3.0), rebuilt(idx, 10))
    assert_same_graph(idx.affinity(5, 2.0), rebuilt(idx, 5, gamma=2.0))  # any k' <= k, any gamma
    idx.save(tmp_path / "g.index")
    again = Index.load(tmp_path / "g.index")
    assert again.graph.k == 10
    idx.add(x[560:], [f"{i}" for i in range(560, 700)])
    again.add(x[560:], [f"{i}" for i in range(560, 700)])
    assert_same_graph(again.affinity(10, 3.0), rebuilt(again, 10))
    np.testing.assert_array_equal(again.graph.ids, idx.graph.ids)


def test_graph_k_larger_than_stored_is_refused():
    idx = Index(8)
    idx.add(clustered(50, 8, 3), [str(i) for i in range(50)])
    idx.build_graph(k=4)
    with pytest.raises(ValueError, match="holds 4 neighbours"):
        idx.affinity(6, 3.0)


@pytest.mark.parametrize("rr", [
    Rerank(qe=5, alpha_qe=3.0),
    Rerank(qe=3),
    Rerank(diffusion=DiffusionParams(k=10, kq=5, trunc=100)),           # truncated, on the stored graph
    Rerank(diffusion=DiffusionParams(k=10, kq=5, trunc=100, sim_weight=0.0)),  # pure diffusion ranking
    Rerank(qe=2, diffusion=DiffusionParams(k=10, kq=5, trunc=0)),       # full diffusion
    Rerank(diffusion={"kq": 4}),                                        # defaults for the database size
    Rerank(diffusion=PAPER),
    Rerank(dba=3),                                                      # DBA: the whole-matrix path
])
def test_search_rerank_on_stored_vectors_equals_rerank_apply(rr):
    x = clustered(600, 16, 10, seed=2)
    q = clustered(4, 16, 10, seed=3)
    idx = Index(16)
    idx.add(x, [f"p{i}" for i in range(600)])
    idx.build_graph(k=10)
    hits, applied = idx.search_rerank(q, 20, rr)
    scores, want_applied = rr.apply(q, x)
    want = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    assert [[h.id for h in row] for row in hits] == want.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits],
                               np.take_along_axis(scores, want, 1), rtol=1e-4, atol=1e-5)
    assert set(applied) == set(want_applied)


def test_search_rerank_does_not_copy_the_matrix(monkeypatch):
    x = clustered(400, 16, 8, seed=4)
    idx = Index(16)
    idx.add(x, [f"p{i}" for i in range(400)])
    idx.build_graph(k=10)
    rr = Rerank(qe=3, diffusion=DiffusionParams(k=10, kq=5, trunc=50))
    scores, _ = rr.apply(x[:2], x)  # the same re-ranking on a copy the test holds
    want = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    monkeypatch.setattr(Index, "vectors", lambda self: pytest.fail("search_rerank copied every vector"))
    hits, _ = idx.search_rerank(x[:2], 5, rr)
    # without the copy, the same top 5 (ids = rows here), scores included, and each query finds itself first
    assert [[h.id for h in row] for row in hits] == want.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], np.take_along_axis(scores, want, 1),
                               rtol=1e-4, atol=1e-5)
    assert [row[0].id for row in hits] == [0, 1]


def test_graph_k_out_of_range_is_refused_before_any_work():
    """A k the manifest could not record (above MAX_NEIGHBOURS, a float, a bool) fails at once."""
    from cbir.schema import MAX_NEIGHBOURS

    idx = Index(8)
    idx.add(clustered(20, 8, 2), [str(i) for i in range(20)])
    for k in (0, MAX_NEIGHBOURS + 1, 2.5, True):
        with pytest.raises(ValueError, match="graph k must be an integer"):
            idx.build_graph(k)
    assert idx.graph is None
