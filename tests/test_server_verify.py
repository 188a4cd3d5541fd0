"""The service with spatial verification: inlier counts and correspondences in the search API, the
local features kept in step by uploads and removals, no 5xx when they are missing or damaged."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DEMO, warped_copy

fastapi_testclient = pytest.importorskip("fastapi.testclient")
BASE = "http://127.0.0.1"
QUERY = DEMO / "jpg" / "paris_eiffel_000266.jpg"

pytestmark = pytest.mark.slow


def client_for(verify_index, **kw):
    from cbir.index.local import load_verify
    from cbir.rerank.compose import Rerank
    from cbir.server import create_app

    idx, path, encoder, _ = verify_index
    rerank = kw.pop("rerank", Rerank(verify=load_verify(path)))
    app = create_app(idx, index_path=path, encoder=encoder, device="cpu", rerank=rerank, **kw)
    return fastapi_testclient.TestClient(app, base_url=BASE)


def test_search_returns_inliers_and_correspondences(verify_index, tmp_path):
    idx, path, _, wid = verify_index
    client = client_for(verify_index)
    r = client.post("/api/search", files={"file": ("q.jpg", QUERY.read_bytes(), "image/jpeg")},
                    data={"top": "5", "matches": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    first = body["results"][0]
    assert first["id"] == wid and first["inliers"] >= 100
    assert all(h["inliers"] is not None for h in body["results"])  # all 5 are in the verified top 20
    assert body["query"]["verify"]["k"] == 20 and body["query"]["verify"]["pairs"] == 11
    # the correspondences map by the known warp: p_query = M [p_warped, 1] (both in their own pixels)
    m = warped_copy(QUERY, tmp_path / "again.jpg")
    lines = np.asarray(first["matches"])
    assert lines.shape == (min(first["inliers"], 500), 4)
    err = np.linalg.norm(np.c_[lines[:, 2:], np.ones(len(lines))] @ m.T - lines[:, :2], axis=1)
    assert np.median(err) < 1.0
    assert body["query"]["size"] == [512, 384] and first["size"] == [512, 384]
    # unverified results in the top K carry their (small) counts but no lines unless asked
    r = client.post("/api/search", files={"file": ("q.jpg", QUERY.read_bytes(), "image/jpeg")}, data={"top": "3"})
    assert r.status_code == 200 and all(h["matches"] is None for h in r.json()["results"])

    # by id: the warped copy's own photo is itself (-1, first), the query photo is not indexed
    r = client.get(f"/api/search/{wid}", params={"top": 3, "matches": "true"})
    assert r.status_code == 200
    hits = r.json()["results"]
    assert hits[0]["id"] == wid and hits[0]["inliers"] == -1 and len(hits[0]["matches"]) == 500
    for bad in ("-1", "0.5", str(2**63), "abc"):
        assert client.get(f"/api/search/{bad}", params={"matches": "true"}).status_code == 422
    assert client.get("/api/search/999999", params={"matches": "true"}).status_code == 404
    assert client.get(f"/api/search/{wid}", params={"matches": "maybe"}).status_code == 422


def test_uploads_and_removals_keep_the_local_features_in_step(verify_index):
    from cbir.index.local import LOCAL_DIR
    from cbir.local.store import LocalFeatureStore

    idx, path, _, wid = verify_index
    client = client_for(verify_index)
    r = client.post("/api/images", files={"file": ("mine.jpg", QUERY.read_bytes(), "image/jpeg")})
    assert r.status_code == 201, r.text
    new = r.json()["id"]
    assert r.json()["detail"] is None
    assert str(new) in LocalFeatureStore(path / LOCAL_DIR)
    r = client.post("/api/search", files={"file": ("q.jpg", QUERY.read_bytes(), "image/jpeg")}, data={"top": "2"})
    assert [(h["id"], h["inliers"]) for h in r.json()["results"]][0] == (new, -1)  # the upload is the query itself
    assert client.delete(f"/api/images/{new}").status_code == 200
    assert str(new) not in LocalFeatureStore(path / LOCAL_DIR)
    assert set(LocalFeatureStore(path / LOCAL_DIR).keys()) == {str(r.id) for r in idx.records()}


def test_no_5xx_without_or_with_damaged_local_features(verify_index):
    import shutil

    from cbir.index.local import LOCAL_DIR, NO_LOCAL

    idx, path, _, wid = verify_index
    client = client_for(verify_index)
    # a damaged shard: the search answers, unverified, and says so
    shard = next((path / LOCAL_DIR / "shards").glob("*.descriptors.npy"))
    shard.write_bytes(b"not an array")
    r = client.get(f"/api/search/{wid}", params={"top": 3})
    assert r.status_code == 200 and r.json()["query"]["verify"].startswith("failed")
    # the features gone while serving: plain searches (once the reader looks again)
    shutil.rmtree(path / LOCAL_DIR)
    client.app.state.service.local.recheck = 0.0
    r = client.get(f"/api/search/{wid}", params={"top": 3})
    assert r.status_code == 200 and all(h["inliers"] is None for h in r.json()["results"])
    # an app asked to verify on an index without local features refuses to start, in one line
    from cbir.rerank.compose import Rerank
    from cbir.server import create_app

    with pytest.raises(ValueError, match="has no local features for --verify"):
        create_app(idx, index_path=path, device="cpu", rerank=Rerank(verify={}))
    assert "cbir index add" in NO_LOCAL(path)


def test_fuzz_the_verifying_search_endpoints(verify_index):
    """schemathesis on the search endpoints of a verifying service (matches, ids, tops, files): no 5xx,
    every response as the schema says."""
    schemathesis = pytest.importorskip("schemathesis")
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)
    from schemathesis.generation import GenerationMode

    from cbir.server import BackgroundServer

    app = client_for(verify_index).app
    schema = schemathesis.openapi.from_dict(app.openapi())
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    statuses: dict[int, int] = {}
    with BackgroundServer(app) as url:
        ops = [r.ok() for r in schema.get_all_operations() if r.ok().path.startswith("/api/search")]
        assert len(ops) == 2
        for op in ops:
            for case in schema.iter_coverage_cases(op, generation_modes=[GenerationMode.POSITIVE,
                                                                         GenerationMode.NEGATIVE],
                                                   generation_config=schema.config.generation_for(operation=op)):
                resp = case.call_and_validate(base_url=url, checks=checks)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @settings(max_examples=6, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case):
                    resp = case.call_and_validate(base_url=url, checks=checks)
                    statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

                try:
                    run()
                except hypothesis.errors.Unsatisfiable:
                    pass
    assert statuses and not any(s >= 500 for s in statuses), statuses
