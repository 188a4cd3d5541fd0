"""``cbir tune`` and recipes: the search never reads the test set, recipes round-trip and apply
exactly the documented steps, cross-validated Lw, matching pairs by hand."""

from __future__ import annotations

import argparse
import pickle
import shutil

import numpy as np
import pytest

from cbir.cli import main
from cbir.datasets import from_gnd_file
from cbir.datasets.base import RetrievalDataset
from cbir.fileio import FormatError
from cbir.linalg import l2_normalize
from cbir.rerank.diffusion import DiffusionParams
from cbir.cli import CLIError
from cbir.cli.rerank_options import add_arguments, rerank_from_args
from cbir.rerank import Rerank, rerank
from cbir.rerank.recipe import Recipe, WhiteningSpec
from cbir.rerank.tune import Grid, LabelledSet, matching_pairs, tune
from cbir.whitening import learn_lw, learn_pca_whitening

DEMO = __import__("cbir.datasets", fromlist=["demo_root"]).demo_root()


def _synthetic(seed: int, n_classes: int = 12, per: int = 6, d: int = 24):
    """Clustered vectors with a strong nuisance direction; a 'labels' benchmark over them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    nuisance = np.zeros(d)
    nuisance[0] = 6.0
    lab = np.repeat(np.arange(n_classes), per)
    x = centres[lab] + 0.6 * rng.normal(size=(len(lab), d)) + rng.normal(size=(len(lab), 1)) * nuisance
    x = l2_normalize(x)
    q_rows = np.arange(0, len(lab), per)  # the first image of each class is a query
    gnd = [{"ok": [int(j) for j in np.flatnonzero(lab == lab[r]) if j != r], "junk": [int(r)]} for r in q_rows]
    ids = [f"i{k}" for k in range(len(lab))]
    ds = RetrievalDataset(name=f"syn{seed}", protocol="labels", db_ids=ids, db_paths=[None] * len(ids),
                          query_ids=[ids[r] for r in q_rows], query_paths=[None] * len(q_rows),
                          query_bboxes=[None] * len(q_rows), gnd=gnd)
    return LabelledSet(ds.name, x[q_rows], x, ds)


SMALL = Grid(pca_power=(0.5,), shrinkage=(0.5,), dims=(None, 8), qe=(0, 2), dba=(0, 3), diffusion_k=(None,),
             diffusion_kq=(3,), diffusion_alpha=(0.8,), diffusion_sim_weight=(0.5,))


def test_matching_pairs_by_hand():
    gnd = [{"easy": [0, 2], "hard": [3], "junk": [1], "bbx": None}, {"easy": [1], "hard": [], "junk": [], "bbx": None}]
    ds = RetrievalDataset("t", "revisitop", ["a", "b", "c", "d"], [None] * 4, ["q0", "q1"], [None] * 2, [None] * 2, gnd)
    s = LabelledSet("t", np.eye(2, 3, dtype=np.float32), np.eye(4, 3, dtype=np.float32), ds)
    x, pairs = matching_pairs([s])
    assert x.shape == (6, 3)  # 4 database rows, then the 2 queries
    # query 0 is row 4: its group {4, 0, 2, 3} gives 6 pairs (junk 1 left out); query 1 (row 5): {5, 1}
    assert sorted(map(tuple, pairs.tolist())) == [(0, 2), (0, 3), (0, 4), (1, 5), (2, 3), (2, 4), (3, 4)]
    _, only_first = matching_pairs([s], rows=[np.array([1])])
    assert only_first.tolist() == [[1, 5]]


def test_tune_picks_settings_and_never_scores_lw_on_its_own_pairs():
    sets = [_synthetic(0), _synthetic(1)]
    recipe, trials = tune(sets, SMALL)
    lw = [t for t in trials if t["step"] == "whitening" and t["whitening"]["method"] == "lw"]
    assert lw and all("objective" in t for t in lw)
    # the Lw figure is cross-validated: learned on half of the queries' pairs, scored on the rest
    s = sets[0]
    half = np.arange(0, len(s.q), 2)
    x, pairs = matching_pairs([s], rows=[half])
    assert len(pairs) < len(matching_pairs([s])[1])
    # the chosen recipe is at least as good as raw on the validation sets (ties keep "none")
    raw = np.mean([t["objective"] for t in trials if t["step"] == "whitening" and t["whitening"]["method"] == "none"])
    assert recipe.meta["objective"]["value"] >= raw
    assert recipe.meta["tuned_on"][0]["name"] == "syn0"


def test_recipe_round_trip_and_apply_equals_the_steps(tmp_path):
    rng = np.random.default_rng(0)
    db = l2_normalize(rng.normal(size=(80, 16)))
    q = l2_normalize(rng.normal(size=(4, 16)))
    rr = Rerank(qe=2, alpha_qe=3.0, dba=3, dba_alpha=3.0, diffusion={"kq": 3, "alpha": 0.9})
    # a rule: PCA learned on the database it is applied to
    rule = Recipe(WhiteningSpec("pca", "database", power=0.5, shrinkage=0.1, dim=8), rr)
    rule.save(tmp_path / "rule.json")
    back = Recipe.load(tmp_path / "rule.json")
    assert back.spec == rule.spec and back.rerank == rr
    w = learn_pca_whitening(db, power=0.5, dim=8, shrinkage=0.1)
    expected, _ = rerank(w.apply(q), w.apply(db), dba_k=3, dba_alpha=3.0, qe_k=2, qe_alpha=3.0,
                         diffusion=DiffusionParams.for_database(80, kq=3, alpha=0.9))
    np.testing.assert_allclose(back.apply(q, db)[0], expected, rtol=1e-5, atol=1e-6)
    # a learned whitening travels in a sidecar file whose sha256 the recipe checks
    lw = learn_lw(db, np.array([[0, 1], [2, 3], [4, 5]]), shrinkage=0.5)
    learned = Recipe(WhiteningSpec("lw", "validation", shrinkage=0.5), Rerank(), learned=lw)
    learned.save(tmp_path / "lw.json")
    np.testing.assert_allclose(Recipe.load(tmp_path / "lw.json").apply(q, db)[0], lw.apply(q) @ lw.apply(db).T,
                               rtol=1e-5, atol=1e-6)
    side = tmp_path / "lw.whiten.npz"
    learn_pca_whitening(db).save(side)  # replaced by another whitening
    with pytest.raises(FormatError, match="sha256"):
        Recipe.load(tmp_path / "lw.json")
    (tmp_path / "bad.json").write_text('{"format": "descriptors", "format_version": 1}')
    with pytest.raises(FormatError, match="not a cbir recipe"):
        Recipe.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="Lw needs matching pairs"):
        WhiteningSpec("lw", "database")


def test_recipe_option_in_evaluate_and_search_parsers(tmp_path):
    rng = np.random.default_rng(1)
    db = l2_normalize(rng.normal(size=(50, 8)))
    q = l2_normalize(rng.normal(size=(3, 8)))
    Recipe(WhiteningSpec(), Rerank(qe=2)).save(tmp_path / "r.json")
    p = argparse.ArgumentParser()
    add_arguments(p)
    scores, applied = rerank_from_args(p.parse_args(["--recipe", str(tmp_path / "r.json")]), q, db)
    np.testing.assert_allclose(scores, Rerank(qe=2).apply(q, db)[0])
    assert applied["recipe"]["whitening"] == {"method": "none"} and applied["qe"]["k"] == 2
    with pytest.raises(CLIError, match="--recipe replaces"):
        rerank_from_args(p.parse_args(["--recipe", str(tmp_path / "r.json"), "--qe"]), q, db)


@pytest.mark.slow
def test_cli_tune_never_reads_the_test_ground_truth(tmp_path, capsys):
    """The same validation set and a test set whose ground truth is poisoned: the same recipe."""
    gnd = pickle.loads((DEMO / "gnd_demo.pkl").read_bytes())
    poisoned = {**gnd, "gnd": [{**g, "easy": [int(i) for i in range(len(gnd["imlist"])) if i not in g["easy"] + g["hard"]][:3],
                                "hard": [], "junk": []} for g in gnd["gnd"]]}
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    shutil.copy(DEMO / "gnd_demo.pkl", test_dir / "gnd_clean.pkl")
    (test_dir / "gnd_poisoned.pkl").write_bytes(pickle.dumps(poisoned))
    common = ["tune", "--val", str(DEMO / "gnd_demo.pkl"), "--imsize", "128", "--scales", "1", "--fast", "--cache", str(tmp_path / "c")]
    outs = []
    for name in ("clean", "poisoned"):
        (tmp_path / name).mkdir()
        out = tmp_path / name / "recipe.json"
        assert main(common + ["--test", str(test_dir / f"gnd_{name}.pkl"), str(DEMO / "jpg"), "--out", str(out),
                              "--report", str(tmp_path / f"{name}.report.json")]) == 0
        outs.append(out)
    import json

    docs = [json.loads(o.read_text()) for o in outs]
    for d in docs:  # the sidecar's sha256 covers its zip timestamps; compare the arrays instead
        d["whitening"].pop("sha256", None)
    assert docs[0] == docs[1]
    a, b = (Recipe.load(o) for o in outs)
    assert a.spec == b.spec and a.rerank == b.rerank
    if a.learned is not None:
        np.testing.assert_array_equal(a.learned.proj, b.learned.proj)
    reports = [json.loads((tmp_path / f"{n}.report.json").read_text()) for n in ("clean", "poisoned")]
    assert reports[0]["trials"] == reports[1]["trials"]
    # the test figures were read (after the recipe): the poisoned ground truth scores differently
    assert reports[0]["test"]["clean"]["raw"] != reports[1]["test"]["poisoned"]["raw"]
    recipe = Recipe.load(outs[0])
    ds = from_gnd_file(DEMO / "gnd_demo.pkl")
    assert recipe.meta["tuned_on"][0]["n_db"] == len(ds.db_ids)


def test_folds_keep_queries_that_share_positives_together():
    from cbir.rerank.tune import _folds, query_groups

    gnd = [{"easy": [0, 1], "hard": [], "junk": []}, {"easy": [5], "hard": [], "junk": []},
           {"easy": [], "hard": [1, 2], "junk": []}, {"easy": [3], "hard": [], "junk": []},
           {"easy": [2], "hard": [], "junk": []}]
    ds = RetrievalDataset("t", "revisitop", [str(i) for i in range(6)], [None] * 6, [f"q{i}" for i in range(5)],
                          [None] * 5, [None] * 5, [{**g, "bbx": None} for g in gnd])
    g = query_groups(ds)
    assert g[0] == g[2] == g[4] and len({g[0], g[1], g[3]}) == 3  # 0-2 share 1, 2-4 share 2
    folds = _folds(ds, 2)
    assert sorted(np.concatenate(folds).tolist()) == [0, 1, 2, 3, 4]
    assert any({0, 2, 4} <= set(f.tolist()) for f in folds)


def test_index_build_keeps_the_recipe_and_search_and_serve_use_it(tmp_path, capsys):
    import json

    from fastapi.testclient import TestClient

    from cbir.descriptors import Descriptors
    from cbir.index import Index
    from cbir.server import create_app

    rng = np.random.default_rng(5)
    centres = l2_normalize(rng.normal(size=(6, 16)))
    x = l2_normalize(centres[rng.integers(0, 6, 60)] + 0.4 * rng.normal(size=(60, 16)))
    names = [f"img{i:02d}" for i in range(60)]
    Descriptors(names, x, meta={"model": "toy", "pooling": "gem",
                                "paths": {n: str(tmp_path / f"{n}.jpg") for n in names}}).save(tmp_path / "feats")
    recipe = Recipe(WhiteningSpec("pca", "database", power=0.5, shrinkage=0.2), Rerank(qe=3, dba=2))
    recipe.save(tmp_path / "r.json")
    assert main(["index", "build", "--features", str(tmp_path / "feats"), "--out", str(tmp_path / "ix"),
                 "--recipe", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "ix" / "recipe.json").is_file()
    idx = Index.load(tmp_path / "ix")
    ids, db = idx.vectors()
    q = idx.vector(int(ids[7]))
    want = ids[np.argsort(-recipe.apply(q[None], db)[0][0], kind="stable")[:10]].tolist()
    capsys.readouterr()
    assert main(["search", str(tmp_path / "ix"), "--id", str(int(ids[7])), "--top", "10", "--json", "-"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == want
    plain = ids[np.argsort(-(db @ q), kind="stable")[:10]].tolist()
    assert plain != want
    assert main(["search", str(tmp_path / "ix"), "--id", str(int(ids[7])), "--top", "10", "--json", "-",
                 "--recipe", "none"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == plain
    client = TestClient(create_app(tmp_path / "ix", read_only=True, rerank=recipe), base_url="http://127.0.0.1:8000")
    got = client.get(f"/api/search/{int(ids[7])}", params={"top": 10}).json()["results"]
    assert [h["id"] for h in got] == want
    # a bad recipe stops index build before any work
    (tmp_path / "bad.json").write_text("{}")
    assert main(["index", "build", "--features", str(tmp_path / "feats"), "--out", str(tmp_path / "ix2"),
                 "--recipe", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "ix2").exists()


def test_cli_evaluate_with_a_recipe_records_it(tmp_path):
    import json

    from test_cli_evaluate import _toy

    gpath, feats = _toy(tmp_path)
    Recipe(WhiteningSpec(), Rerank(qe=1)).save(tmp_path / "r.json")
    out = tmp_path / "res.json"
    assert main(["evaluate", "--gnd", str(gpath), "--features", str(feats), "--json", str(out),
                 "--recipe", str(tmp_path / "r.json")]) == 0
    res = json.loads(out.read_text())
    assert res["rerank"]["recipe"]["whitening"] == {"method": "none"} and res["rerank"]["qe"]["k"] == 1
    assert main(["evaluate", "--gnd", str(gpath), "--features", str(feats), "--recipe", str(tmp_path / "nope.json")]) == 2


def _with_verifier(s: LabelledSet, informative: bool = True) -> LabelledSet:
    """The set with a fake verifier: 30 inliers for a query's true positives (None: nothing verifies);
    it checks that it is asked with the set's own query rows (not a fold's)."""
    asked = []

    def verifier(i: int, rows) -> np.ndarray:
        assert 0 <= i < len(s.q)
        asked.append(i)
        ok = set(s.dataset.gnd[i]["ok"])
        return np.array([30 if informative and int(r) in ok else 0 for r in rows])

    out = LabelledSet(s.name, s.q, s.db, s.dataset, verifier)
    out.asked = asked
    return out


def _hard(seed: int) -> LabelledSet:
    """_synthetic with much more noise: the global descriptors alone rank the positives poorly."""
    s = _synthetic(seed)
    rng = np.random.default_rng(100 + seed)
    db = l2_normalize(s.db + 0.12 * rng.normal(size=s.db.shape)).astype(np.float32)
    rows = [s.dataset.db_ids.index(i) for i in s.dataset.query_ids]
    return LabelledSet(s.name, db[rows], db, s.dataset)


def test_tune_picks_verification_where_it_helps_and_not_where_it_does_not():
    from cbir.rerank.verify import VerifyParams

    sets = [_with_verifier(_hard(0)), _with_verifier(_hard(1))]
    recipe, trials = tune(sets, SMALL)
    steps = [t for t in trials if t["step"] == "verify"]
    assert len(steps) == len(Grid().verify) == 6  # K in {50, 100} x (first, expansion, both)
    assert {(t["verify"]["k"], t["verify"]["order"], t["verify"]["expand"]) for t in steps} == {
        (k, o, e) for k in (50, 100) for o, e in (("first", False), ("none", True), ("first", True))}
    assert recipe.verify is not None and isinstance(recipe.verify, VerifyParams)
    before = max(t["objective"] for t in trials if t["step"] != "verify")
    assert recipe.meta["objective"]["value"] > before + 5  # the true positives verify: a large gain
    assert all(s.asked for s in sets)
    # the recipe applies with a verifier and carries verify to its file (v2)
    scores, applied = recipe.apply(sets[0].q, sets[0].db, sets[0].verifier)
    assert "verify" in applied
    # an uninformative verifier (nothing verifies) is never chosen; no verifier: the step is skipped
    recipe2, trials2 = tune([_with_verifier(_hard(0), informative=False)], SMALL)
    assert recipe2.verify is None and any(t["step"] == "verify" for t in trials2)
    recipe3, trials3 = tune([_synthetic(0)], SMALL)
    assert recipe3.verify is None and not any(t["step"] == "verify" for t in trials3)


@pytest.mark.slow
def test_cli_tune_verify_tries_verification_with_the_sets_local_features(tmp_path, capsys):
    import json

    from conftest import verify_benchmark

    gnd = verify_benchmark(tmp_path)
    out, report = tmp_path / "r.json", tmp_path / "report.json"
    rc = main(["tune", "--val", str(gnd), "--verify", "--fast", "--imsize", "96", "--scales", "1", "--out", str(out),
               "--report", str(report)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert "10 images extracted, 0 from the cache" in err
    trials = json.loads(report.read_text())["trials"]
    assert [t["verify"]["k"] for t in trials if t["step"] == "verify"] == [50]
    Recipe.load(out)  # v1 or v2, whichever was chosen, loads back
