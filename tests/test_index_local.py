"""An index's local features (cbir.index.local): `cbir index build --verify`, add / update / remove keep
INDEX/local in step, `cbir search` verifies by default, --verify 0, an index without local features;
search_index with verification equals the chain of rerank.compose on an exact index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO, VERIFY_OTHERS, VERIFY_QUERIES, warped_copy

from cbir.cli import main
from cbir.index.local import LOCAL_DIR, LocalFeatures, has_local, load_verify
from cbir.local.store import LocalFeatureStore


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def stored_keys(ix: Path) -> set[str]:
    return set(LocalFeatureStore(ix / LOCAL_DIR).keys())


def index_ids(ix: Path) -> set[str]:
    from cbir.index import Index

    return {str(r.id) for r in Index.load(ix, device="cpu").records()}


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in VERIFY_QUERIES[1:]:
        warped_copy(DEMO / "jpg" / f"{name}.jpg", folder / f"w_{name}.jpg")
    for name in VERIFY_OTHERS:
        shutil.copy(DEMO / "jpg" / f"{name}.jpg", folder / f"{name}.jpg")
    return folder


@pytest.mark.slow
def test_build_search_add_update_remove_keep_the_store_in_step(tmp_path, photos, capsys):
    ix = tmp_path / "p.index"
    rc, out, err = run(capsys, "index", "build", photos, "--out", ix, "--imsize", "96", "--scales", "1",
                       "--verify", "10", "--min-inliers", "20")
    assert rc == 0, err
    assert "6 images described, 0 removed, 6 stored; searches verify the top 10" in err
    assert has_local(ix) and stored_keys(ix) == index_ids(ix) and len(stored_keys(ix)) == 6
    assert load_verify(ix).k == 10 and load_verify(ix).min_inliers == 20

    # search with a photo: its warped copy verifies (hundreds of inliers) and comes first
    query = DEMO / "jpg" / f"{VERIFY_QUERIES[1]}.jpg"
    rc, out, err = run(capsys, "search", ix, "--image", query, "--top", "6", "--json", "-")
    hits = json.loads(out)
    assert rc == 0 and Path(hits[0]["path"]).name == f"w_{VERIFY_QUERIES[1]}.jpg" and hits[0]["inliers"] >= 100
    assert all("inliers" in h for h in hits)  # all 6 are in the verified top 10
    assert all(h["inliers"] < 20 for h in hits[1:])
    assert '"verify": {"k": 10, "min_inliers": 20' in err and '"pairs": 6' in err
    rc, out, _ = run(capsys, "search", ix, "--image", query, "--top", "6", "--verify", "0", "--json", "-")
    assert rc == 0 and not any("inliers" in h for h in json.loads(out))
    rc, out, _ = run(capsys, "search", ix, "--image", query, "--top", "3", "--verify", "2")
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "inliers", "id", "path"] and len(lines) == 4

    # add the query photo itself: described (SIFT) too; searching with it finds itself ("itself", -1)
    rc, out, err = run(capsys, "index", "add", ix, query)
    assert rc == 0 and "1 images described, 0 removed, 7 stored" in err
    assert stored_keys(ix) == index_ids(ix)
    rc, out, _ = run(capsys, "search", ix, "--image", query, "--top", "2", "--json", "-")
    first, second = json.loads(out)
    assert Path(first["path"]) == query.resolve() and first["inliers"] == -1
    assert Path(second["path"]).name == f"w_{VERIFY_QUERIES[1]}.jpg" and second["inliers"] >= 100
    rc, out, _ = run(capsys, "search", ix, "--image", query, "--top", "2")
    assert "itself" in out.splitlines()[1]

    # --update of an edited photo: its features are extracted again
    wid = next(r["id"] for r in json.loads(run(capsys, "index", "info", ix, "--json", "--list", "10")[1])["images"]
               if Path(r["path"]).name == f"w_{VERIFY_QUERIES[2]}.jpg")
    before = LocalFeatureStore(ix / LOCAL_DIR).get(str(wid))
    warped_copy(DEMO / "jpg" / f"{VERIFY_QUERIES[2]}.jpg", photos / f"w_{VERIFY_QUERIES[2]}.jpg", angle=-15.0)
    rc, out, err = run(capsys, "index", "add", ix, photos / f"w_{VERIFY_QUERIES[2]}.jpg", "--update")
    assert rc == 0 and "updated 1" in out and "1 images described" in err
    after = LocalFeatureStore(ix / LOCAL_DIR).get(str(wid))
    assert not np.array_equal(before.keypoints[:5], after.keypoints[:5])

    # remove: the store drops them; a store that lost a key (a crash between index and store) is healed
    LocalFeatureStore(ix / LOCAL_DIR).remove(["0"])
    rc, out, err = run(capsys, "index", "remove", ix, "1", "2")
    assert rc == 0 and "1 images described, 2 removed, 5 stored" in err
    assert stored_keys(ix) == index_ids(ix) and "0" in stored_keys(ix) and "1" not in stored_keys(ix)
    rc, out, _ = run(capsys, "index", "info", ix)
    assert "local     5 images, sift-" in out and "verify top 10 by default" in out

    # a rebuild without --verify drops the local features and the setting
    rc, _, err = run(capsys, "index", "build", photos, "--out", ix, "--imsize", "96", "--scales", "1")
    assert rc == 0 and not has_local(ix) and load_verify(ix) is None


def test_verify_on_an_index_without_local_features(tmp_path, capsys):
    from cbir.index import Index

    vecs = np.eye(6, 8, dtype=np.float32)
    folder = tmp_path / "photos"
    shutil.copytree(DEMO / "jpg", folder, ignore=lambda d, names: [n for n in names if n[:-4] not in VERIFY_OTHERS])
    paths = sorted(folder.glob("*.jpg"))
    idx = Index(8, "exact", device="cpu")
    idx.add(vecs[: len(paths)], [str(p) for p in paths])
    ix = tmp_path / "bare.index"
    idx.save(ix)
    rc, out, err = run(capsys, "search", ix, "--id", "1", "--verify", "5")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1
    assert f"has no local features for --verify: add them with `cbir index add {ix} --verify 5`" in lines[0]
    # ... which works: every indexed image described, the setting kept; search --id verifies by default
    rc, out, err = run(capsys, "index", "add", ix, "--verify", "5")
    assert rc == 0 and "4 images described, 0 removed, 4 stored" in err
    assert stored_keys(ix) == {"0", "1", "2", "3"} and load_verify(ix).k == 5
    rc, out, err = run(capsys, "search", ix, "--id", "1", "--top", "4", "--json", "-")
    hits = json.loads(out)
    assert rc == 0 and hits[0]["id"] == 1 and hits[0]["inliers"] == -1  # itself, by its stored features
    # `cbir serve`: the index's setting by default, --verify 0 / K, with a recipe
    from cbir.cli import build_parser
    from cbir.cli.serve import serve_settings
    from cbir.rerank.recipe import Recipe

    def serve(*extra):
        return serve_settings(build_parser("serve").parse_args(["serve", str(ix), *extra]))

    assert serve().verify.k == 5
    assert getattr(serve("--verify", "0"), "verify", None) is None
    both = serve("--recipe", "holidays805-lite0", "--verify", "3")
    assert isinstance(both, Recipe) and both.verify.k == 3 and both.spec.method == "pca"
    rc, out, err = run(capsys, "index", "add", ix, "--verify", "0")
    assert rc == 0 and not has_local(ix) and load_verify(ix) is None
    from cbir.cli import CLIError

    with pytest.raises(CLIError, match="has no local features for --verify"):
        serve("--verify", "5")
    assert serve() is None  # nothing kept: plain searches


def test_local_features_reader_sees_other_writers(tmp_path):
    """LocalFeatures (the service's reader) opens the store again when another process changed it."""
    from cbir.index.local import add_local, remove_local, sync_local

    ix = tmp_path / "ix"
    ix.mkdir()
    photo = DEMO / "jpg" / f"{VERIFY_OTHERS[0]}.jpg"
    sync_local(ix, [(3, str(photo))])
    reader = LocalFeatures(ix, recheck=0.0)
    assert reader.get(3) is not None and reader.get(4) is None
    add_local(ix, [(4, str(DEMO / "jpg" / f"{VERIFY_OTHERS[1]}.jpg"))])
    assert reader.get(4) is not None  # a new shard, seen after the manifest changed
    assert remove_local(ix, [3]) == 1
    assert reader.get(3) is None and reader.get(4) is not None
    res = sync_local(ix, [(4, str(photo))], refresh=[4])  # re-described: now the other photo's features
    assert res["extracted"] == 1 and len(reader.get(4)) == len(LocalFeatureStore(ix / LOCAL_DIR).get("4"))


class Fake:
    def __init__(self, counts):
        self.counts = counts

    def __call__(self, i, ids):
        return np.array([self.counts.get(int(x), 0) for x in ids])


@pytest.mark.parametrize("settings", [
    {"verify": {"k": 20}},
    {"qe": 2, "verify": {"k": 20, "order": "inliers"}},
    {"qe": 2, "diffusion": True, "verify": {"k": 20}},
    {"dba": 3, "verify": {"k": 20, "expand": False}},
    {"qe": 1, "verify": {"k": 20, "order": "add", "weight": 0.05}},
])
def test_search_index_with_verification_equals_the_chain(settings):
    """On an exact index, search_index (stored vectors, top k + K) orders as Rerank.apply over all rows."""
    from cbir.index import Index
    from cbir.linalg import l2_normalize
    from cbir.pipeline.searching import search_index
    from cbir.rerank.compose import Rerank

    rng = np.random.default_rng(1)
    db = l2_normalize(rng.normal(size=(60, 16))).astype(np.float32)
    q = l2_normalize(rng.normal(size=(1, 16))).astype(np.float32)[0]
    idx = Index(16, "exact", device="cpu")
    ids = idx.add(db, [f"/x/{i}.jpg" for i in range(60)])
    base = np.argsort(-(db @ q), kind="stable")
    fake = Fake({int(ids[base[7]]): 40, int(ids[base[15]]): 20, int(ids[base[2]]): -1})
    r = Rerank(**settings)
    hits, applied = search_index(idx, q, 10, r, verifier=fake)
    scores, _ = r.apply(q[None], db, lambda i, rows: fake(0, ids[rows]))
    assert [h.id for h in hits] == ids[np.argsort(-scores[0], kind="stable")[:10]].tolist()
    assert {h.id: h.inliers for h in hits if h.inliers}[int(ids[base[7]])] == 40
    assert applied["verify"]["same_image"] == 1
    with pytest.raises(ValueError, match="verify needs local features"):
        search_index(idx, q, 10, r)
