"""Candidate pairs from the global kNN (cbir.sfm.pairs)."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.sfm.pairs import knn_pairs


def _naive(x: np.ndarray, k: int, valid: np.ndarray) -> set[tuple[int, int]]:
    out = set()
    rows = np.flatnonzero(valid)
    for i in rows:
        sims = sorted(((float(x[i] @ x[j]), -int(j)) for j in rows if j != i), reverse=True)[:k]
        for _, mj in sims:
            out.add((min(int(i), -mj), max(int(i), -mj)))
    return out


@pytest.mark.parametrize("chunk", [3, 1024])
def test_pairs_are_each_photos_k_nearest_deduplicated(chunk):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    valid = np.ones(40, dtype=bool)
    valid[[3, 17]] = False
    pairs, sims = knn_pairs(x, 4, valid=valid, chunk_rows=chunk)
    assert {tuple(p) for p in pairs.tolist()} == _naive(x, 4, valid)
    assert (pairs[:, 0] < pairs[:, 1]).all() and len(np.unique(pairs, axis=0)) == len(pairs)
    assert (np.lexsort((pairs[:, 1], pairs[:, 0])) == np.arange(len(pairs))).all()  # sorted
    assert not np.isin(pairs, [3, 17]).any()
    # between N k / 2 and N k pairs; similarities are the dot products
    assert 38 * 4 / 2 <= len(pairs) <= 38 * 4
    np.testing.assert_allclose(sims, np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]]), rtol=1e-6)


def test_k_capped_and_degenerate_inputs():
    x = np.eye(3, dtype=np.float32)
    pairs, _ = knn_pairs(x, 10)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    pairs, _ = knn_pairs(x, 1, valid=np.array([True, False, False]))
    assert pairs.shape == (0, 2)
    with pytest.raises(ValueError, match="k must be"):
        knn_pairs(x, 0)
