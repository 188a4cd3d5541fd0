"""The shared re-ranking options: parsing, composition order, JSON record, whitening file."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from cbir.descriptors import l2_normalize
from cbir.rerank.diffusion import DiffusionParams, diffusion_scores
from cbir.cli import CLIError
from cbir.cli.rerank_options import add_arguments, rerank_from_args
from cbir.rerank import rerank
from cbir.rerank.qe import alpha_qe, dba
from cbir.whitening import learn_pca_whitening


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = l2_normalize(rng.normal(size=(20, 16)))
    db = l2_normalize(centers[rng.integers(0, 20, 400)] + 0.3 * rng.normal(size=(400, 16)))
    q = l2_normalize(centers[:5] + 0.3 * rng.normal(size=(5, 16)))
    return q, db


def test_no_options_is_plain_inner_product(data):
    q, db = data
    scores, applied = rerank_from_args(_parser().parse_args([]), q, db)
    assert applied == {}
    assert scores.dtype == np.float32 and scores.shape == (5, 400)
    np.testing.assert_allclose(scores, q @ db.T, atol=1e-6)


def test_composition_order_matches_manual_pipeline(data, tmp_path):
    q, db = data
    w = learn_pca_whitening(db, power=0.5)
    w.save(tmp_path / "w.npz")
    args = _parser().parse_args(
        ["--whiten", str(tmp_path / "w.npz"), "--dba", "3", "--qe", "4", "--alpha-qe", "3",
         "--diffusion", "--diffusion-k", "10", "--diffusion-trunc", "0"]
    )
    scores, applied = rerank_from_args(args, q, db)
    # the same steps by hand, in the documented order
    qw, dbw = w.apply(q), w.apply(db)
    dbw = dba(dbw, 3, alpha=3.0)
    qw = alpha_qe(qw, dbw, 4, alpha=3.0)
    expected = diffusion_scores(qw, dbw, DiffusionParams.for_database(len(db), k=10, trunc=0))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert list(applied) == ["whiten", "dba", "qe", "diffusion"]
    assert applied["whiten"]["file"].endswith("w.npz") and applied["whiten"]["power"] == 0.5
    assert applied["qe"] == {"k": 4, "alpha": 3.0, "kind": "alpha-qe"}
    assert applied["diffusion"]["k"] == 10 and applied["diffusion"]["truncated"] is False
    json.dumps(applied)  # JSON-ready


def test_defaults_follow_the_database_size(data):
    q, db = data
    args = _parser().parse_args(["--diffusion", "--qe", "--dba"])
    assert (args.qe, args.dba, args.alpha_qe) == (2, 5, None)
    _, applied = rerank_from_args(args, q, db)
    assert applied["qe"] == {"k": 2, "alpha": 3.0, "kind": "alpha-qe"}
    assert applied["dba"] == {"k": 5, "alpha": 3.0}
    d = applied["diffusion"]
    assert (d["k"], d["kq"], d["alpha"], d["trunc"], d["sim_weight"]) == (20, 3, 0.8, 0, 0.5)  # n = 400
    # k = min(20, max(2, n // 10)); truncation only above 100,000 images
    assert DiffusionParams.for_database(38).k == 3 and DiffusionParams.for_database(5).k == 2
    assert DiffusionParams.for_database(10**5).trunc == 0 and DiffusionParams.for_database(10**5 + 1).trunc == 10_000
    assert DiffusionParams.for_database(10**6, k=7, trunc=0) == DiffusionParams(k=7, trunc=0)


def test_missing_attributes_mean_off(data):
    q, db = data
    scores, applied = rerank_from_args(argparse.Namespace(), q, db)
    assert applied == {}


def test_bad_inputs_are_named(data, tmp_path):
    q, db = data
    with pytest.raises(ValueError, match="dimension"):
        rerank(q[:, :8], db)
    with pytest.raises(CLIError, match="^--alpha-qe needs --qe"):
        rerank_from_args(_parser().parse_args(["--alpha-qe", "3"]), q, db)
    with pytest.raises(FileNotFoundError, match="whitening file not found"):
        rerank_from_args(_parser().parse_args(["--whiten", str(tmp_path / "nope.npz")]), q, db)
    with pytest.raises(CLIError, match=r"^--diffusion-alpha: must be a finite number in \[0, 1\) \(got 1.0\)"):
        rerank_from_args(_parser().parse_args(["--diffusion", "--diffusion-alpha", "1.0"]), q, db)
