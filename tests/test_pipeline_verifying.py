"""Spatial verification through `cbir evaluate --verify` and cbir.pipeline (score / benchmark_verifier),
on a tiny benchmark of demo photos and synthetic warped copies: local features extracted once into the
cache, a second run extracts nothing; the query's own photo is never its verified expansion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import verify_benchmark

from cbir.cli import main

pytestmark = pytest.mark.slow


def _evaluate(capsys, *args) -> tuple[int, str, str]:
    rc = main(["evaluate", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return rc, out, err


def test_evaluate_verify_extracts_once_and_reports(tmp_path, capsys):
    gnd = verify_benchmark(tmp_path)
    common = ["--gnd", gnd, "--imsize", "128", "--scales", "1", "--quiet"]
    rc, out, err = _evaluate(capsys, *common, "--verify", "5", "--json", tmp_path / "v.json", "--plot", tmp_path / "p.png")
    assert rc == 0, err
    # 8 database photos + 2 query photos (the first query is a database photo, uncropped: the same image)
    assert "10 extracted, 0 from the cache" in out, out
    rec = json.loads((tmp_path / "v.json").read_text())
    v = rec["rerank"]["verify"]
    assert v["k"] == 5 and v["same_image"] == 1 and v["queries_verified"] == 3 and v["verified"] >= 1
    assert rec["verification"]["pairs"] >= 3 * 4 and rec["verification"]["local_features"]["extracted"] == 10
    assert rec["mAP"]["medium"] == pytest.approx(100.0)  # each warped copy verifies: first
    assert (tmp_path / "p.png").is_file() and (tmp_path / "p-matches.png").is_file()

    rc, out, err = _evaluate(capsys, *common, "--verify", "5")
    assert rc == 0, err
    assert "0 extracted, 10 from the cache" in out, out  # the second run extracts nothing
    assert "1 queries' own photos (never their expansion)" in out

    rc, out, _ = _evaluate(capsys, *common, "--verify", "5", "--min-inliers", "100000", "--json", tmp_path / "n.json")
    assert rc == 0 and json.loads((tmp_path / "n.json").read_text())["rerank"]["verify"]["verified"] == 0

    # `cbir cache info` lists the local features, `cbir cache clear` deletes them too
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["10", "images"] and "local features sift-" in line for line in out.splitlines())
    assert main(["cache", "clear"]) == 0
    assert "and the local features of 10 images" in capsys.readouterr().out
    rc, out, err = _evaluate(capsys, *common, "--verify", "5")
    assert rc == 0 and "10 extracted, 0 from the cache" in out


@pytest.mark.parametrize("opts, flag", [
    (["--verify", "-3"], "--verify"),
    (["--verify", "100000"], "--verify"),
    (["--verify", "5", "--verify-order", "sideways"], "--verify-order"),
    (["--verify", "5", "--min-inliers", "0"], "--min-inliers"),
    (["--verify", "5", "--verify-order", "add", "--verify-weight", "nan"], "--verify-weight"),
    (["--min-inliers", "20"], "--min-inliers"),
])
def test_bad_verify_values_are_one_line_naming_the_flag(tmp_path, capsys, opts, flag):
    gnd = verify_benchmark(tmp_path)
    rc, out, err = _evaluate(capsys, "--gnd", gnd, "--imsize", "64", "--scales", "1", "--quiet",
                             "--json", tmp_path / "x.json", *opts)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"cbir evaluate: error: {flag}"), lines[0]
    assert not (tmp_path / "x.json").exists()


def test_score_holidays_like_query_is_not_its_own_expansion(tmp_path):
    """Query 0 is also database photo 7 (whole image): the verifier says SAME_IMAGE for it, and the
    expanded query is q + its warped copy only (not q + itself)."""
    from cbir.linalg import l2_normalize
    from cbir.model import ModelSpec
    from cbir.pipeline import benchmark_verifier, describe, load_benchmark, score
    from cbir.rerank.compose import SAME_IMAGE, Rerank
    from cbir.rerank.verify import VerifyParams

    bench = load_benchmark(verify_benchmark(tmp_path))
    q, db = describe(bench, ModelSpec("efficientnet_lite0", "gem"), imsize=128, scales=(1.0,),
                     cache_dir=tmp_path / "cache")
    verifier = benchmark_verifier(bench, cache_dir=tmp_path / "cache", device="cpu")
    assert verifier.extraction.extracted == 10
    params = VerifyParams(k=8, order="none")
    res = score(bench, q, db, Rerank(verify=params), verifier=verifier, keep_scores=True, device="cpu")
    counts = verifier(0, np.arange(8))
    assert counts[7] == SAME_IMAGE and counts[0] >= 100 and (counts[1:7] < 15).all(), counts
    qv, dbv = np.asarray(q.vectors), np.asarray(db.vectors)
    want = dbv @ l2_normalize((qv[0] + dbv[0])[None])[0]
    np.testing.assert_allclose(res["scores"][0], want, atol=1e-5)
    assert res["applied"]["verify"]["same_image"] == 1
    # through score() without a verifier: built from the cache (nothing extracted again)
    res2 = score(bench, q, db, Rerank(verify=params), cache_dir=tmp_path / "cache", device="cpu")
    assert res2["verification"]["local_features"]["extracted"] == 0
    assert res2["mAP"]["medium"] == res["mAP"]["medium"]
