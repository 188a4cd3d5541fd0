"""``cbir adapt`` end to end on demo photos and warped copies (cbir.adapt.run, cli/adapt).

4 real photos of two landmarks (bundled demo) and 2 copies of each warped by known homographies:
a photo and its copies verify, so 4 clusters of 3 form; adapt learns Lw from them, tunes the
re-ranking on them and writes a recipe that ``cbir evaluate --recipe`` uses. A ground-truth file
poisoned to run code, left beside the photos, changes nothing and is never opened. Small settings
(global descriptors at 96 px, SIFT at 320 px / 400 features, the fast search) keep it to seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.adapt import AdaptSettings, TooFewPairs, adapt
from cbir.rerank.recipe import Recipe
from cbir.whitening import Whitening

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"
PHOTOS = ["paris_louvre_000081", "paris_louvre_000019", "paris_eiffel_000005", "paris_eiffel_000041"]
WARPS = [np.array([[0.85, 0.12, 30.0], [-0.08, 0.9, 25.0], [2e-4, 1e-4, 1.0]]),
         np.array([[1.05, -0.1, -10.0], [0.06, 0.95, 12.0], [-1e-4, 2e-4, 1.0]])]
OPTS = ["--imsize", "96", "--scales", "1", "--k", "3", "--max-size", "320", "--max-features", "400", "--fast",
        "--min-pairs", "3", "--device", "cpu", "--workers", "1", "--quiet"]


def _warp(im: Image.Image, h: np.ndarray) -> Image.Image:
    inv = np.linalg.inv(h)
    inv = inv / inv[2, 2]
    return im.transform(im.size, Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8]), Image.Resampling.BICUBIC)


def make_folder(root: Path) -> Path:
    """4 demo photos and 2 warped copies of each (12 photos, 4 groups of 3)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        im = Image.open(DEMO / f"{name}.jpg").convert("RGB")
        im.save(root / f"{name}.jpg", quality=92)
        for w, h in enumerate(WARPS):
            _warp(im, h).save(root / f"{name}_w{w}.jpg", quality=92)
    return root


class _Poison:
    """Unpickling this creates the file ``path``: proof that someone loaded the pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def poison(folder: Path, sentinel: Path) -> list[Path]:
    """Ground-truth files beside the photos that claim every photo matches every other, and a
    pickle that runs code when loaded."""
    names = sorted(p.name for p in folder.glob("*.jpg"))
    gnd = {"imlist": names, "qimlist": names,
           "gnd": [{"easy": list(range(len(names))), "hard": [], "junk": [], "bbx": None} for _ in names],
           "hook": _Poison(str(sentinel))}
    files = [folder / "gnd_photos.pkl", folder / "gnd.json", folder / "labels.txt"]
    files[0].write_bytes(pickle.dumps(gnd))
    files[1].write_text(json.dumps({"positives": {n: names for n in names}}))
    files[2].write_text("\n".join(f"{n} 0" for n in names))
    return files


def run_cli(*args: str, audit: Path | None = None) -> subprocess.CompletedProcess:
    """``cbir`` in a subprocess; with ``audit``, every file it opens is listed there (an audit hook)."""
    code = "import sys\n"
    if audit is not None:
        code += ("import os, json\nopened = []\n"
                 "def hook(event, args):\n"
                 "    if event == 'open' and args and isinstance(args[0], (str, bytes, os.PathLike)):\n"
                 "        opened.append(os.path.abspath(os.fsdecode(args[0])))\n"
                 "sys.addaudithook(hook)\n")
    code += "from cbir.cli import main\nrc = main(sys.argv[1:])\n"
    if audit is not None:
        code += f"seen = list(opened)\nopen({str(audit)!r}, 'w').write(json.dumps(seen))\n"
    code += "sys.exit(rc)\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("adapt") / "photos")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapt-cache")


@pytest.fixture(scope="module")
def adapted(photos, cache, tmp_path_factory):
    """``cbir adapt`` on the clean folder (in this process) -> (recipe path, printed JSON report)."""
    from cbir.cli import main

    out = tmp_path_factory.mktemp("adapt-out") / "photos.recipe.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["adapt", str(photos), "--out", str(out), "--cache", str(cache), "--json", *OPTS])
    assert rc == 0
    return out, json.loads(buf.getvalue())


def test_report_counts_pairs_clusters_and_learned_whitening(adapted):
    out, r = adapted
    assert r["photos"] == 12 and r["unreadable"] == 0
    # each photo verifies with its warped copies: 4 groups of 3 (3 pairs each), groups never join
    assert r["clusters"] == 4 and r["clustered_photos"] == 12 and r["verified_pairs"] >= 12
    assert r["queries"] == 12 and r["matching_pairs"] == r["verified_pairs"]  # positives: verified partners
    assert r["whitening"]["method"] == "lw" and r["whitening"]["out_dim"] == 512
    assert [f["learned_on_photos"] for f in r["folds"]] == [6, 6]
    assert set(r["pseudo_gt"]) == {"raw", "lw", "recipe"} and 0 <= r["pseudo_gt"]["recipe"] <= 100
    assert r["recipe"] == str(out)


def test_recipe_round_trip_is_the_lw_of_the_pairs(adapted, photos, cache):
    """The file loads back as written; its whitening is learn_lw on the matching pairs (a naive
    re-computation from the mined clusters)."""
    from cbir.adapt.pseudo import matching_pairs, positive_lists, verified_edges
    from cbir.whitening import learn_lw

    out, r = adapted
    recipe = Recipe.load(out)
    assert recipe.spec.method == "lw" and recipe.spec.fit == "validation" and recipe.spec.dim == 512
    assert recipe.spec.shrinkage == pytest.approx(0.5)
    side = Whitening.load(out.with_name(out.stem + ".whiten.npz"))
    np.testing.assert_array_equal(side.proj, recipe.learned.proj)
    assert recipe.rerank.to_dict() == {k: v for k, v in r["rerank"].items()}
    doc = json.loads(out.read_text())
    assert doc["format"] == "recipe" and doc["tuned_on"][0]["photos"] == 12
    assert doc["descriptors"]["imsize"] == 96 and doc["descriptors"]["scales"] == [1.0]
    # the same projection from the mining work, by hand
    from cbir.sfm.verified import verified_pairs

    settings = _settings()
    names = sorted(p.name for p in photos.glob("*.jpg"))
    vp = verified_pairs([photos / n for n in names], settings.pairs, r["work_dir"], keys=names, device="cpu",
                        cache_dir=cache)
    edges = verified_edges(vp.pairs, vp.inliers, vp.min_inliers, vp.cut)
    pos = positive_lists(12, edges, vp.clusters, "verified")
    assert sorted(map(tuple, matching_pairs(pos).tolist())) == sorted(map(tuple, edges.tolist()))
    again = learn_lw(vp.vectors, edges, dim=512, shrinkage=0.5)
    np.testing.assert_allclose(again.proj, recipe.learned.proj, rtol=1e-5, atol=1e-6)
    # photos of one group are closer to each other than to any other photo after the whitening
    z = again.apply(vp.vectors)
    s = z @ z.T
    group = np.array([PHOTOS.index(n.split("_w")[0].removesuffix(".jpg")) for n in names])
    for i in range(12):
        same = (group == group[i]) & (np.arange(12) != i)
        assert s[i, same].min() > s[i, ~same & (np.arange(12) != i)].max()


def _settings() -> AdaptSettings:
    from cbir.local.features import LocalFeatureSettings
    from cbir.sfm.settings import PairSettings

    return AdaptSettings(pairs=PairSettings(imsize=96, scales=(1.0,), k=3,
                                            local=LocalFeatureSettings(max_size=320, max_features=400)),
                         search="fast", min_pairs=3)


def test_library_call_reads_back_the_mining_and_gives_the_same_recipe(adapted, photos, cache, tmp_path):
    out, _ = adapted
    recipe, report = adapt(photos, _settings(), cache_dir=cache, device="cpu")
    assert report.seconds.get("describe") is not None  # read back from the work folder
    recipe.save(tmp_path / "again.json")
    a, b = json.loads(out.read_text()), json.loads((tmp_path / "again.json").read_text())
    a["whitening"].pop("sha256"), b["whitening"].pop("sha256")  # npz zip entries carry a date
    a["whitening"].pop("file"), b["whitening"].pop("file")
    assert a == b
    np.testing.assert_array_equal(recipe.learned.proj, Recipe.load(out).learned.proj)


def test_recipe_works_with_evaluate(adapted, cache, tmp_path):
    """``cbir evaluate --recipe FILE`` applies the adapted whitening and re-ranking."""
    out, r = adapted
    js = tmp_path / "res.json"
    p = run_cli("evaluate", "--dataset", "demo", "--imsize", "96", "--scales", "1", "--device", "cpu",
                "--cache-dir", str(cache), "--quiet", "--recipe", str(out), "--json", str(js))
    assert p.returncode == 0, p.stderr
    res = json.loads(js.read_text())
    text = json.dumps(res)
    assert '"lw"' in text and 0 < res["mAP"]["medium"] <= 100
    applied = res.get("rerank") or res.get("applied") or {}
    assert "recipe" in json.dumps(applied)


def test_poisoned_ground_truth_changes_nothing_and_is_never_opened(adapted, photos, cache, tmp_path):
    """A copy of the folder with ground-truth files beside the photos (one a pickle that would run
    code): adapt in a subprocess with an audit hook writes the same recipe, and of the files under
    the folder it opened only photos."""
    out, _ = adapted
    folder = tmp_path / "poisoned"
    shutil.copytree(photos, folder)
    sentinel = tmp_path / "pickle_was_loaded"
    bad = poison(folder, sentinel)
    audit = tmp_path / "opened.json"
    recipe = tmp_path / "poisoned.recipe.json"
    p = run_cli("adapt", str(folder), "--out", str(recipe), "--cache", str(cache), *OPTS, audit=audit)
    assert p.returncode == 0, p.stderr
    assert not sentinel.exists()
    opened = json.loads(audit.read_text())
    root = str(folder.resolve())
    under = {Path(f).resolve() for f in opened if str(Path(f).resolve()).startswith(root + os.sep)}
    assert under, "the audit hook saw no photo opened (is it recording?)"
    assert all(f.suffix == ".jpg" for f in under), sorted(str(f) for f in under if f.suffix != ".jpg")
    assert not {b.resolve() for b in bad} & under
    a, b = json.loads(out.read_text()), json.loads(recipe.read_text())
    for d in (a, b):
        d["whitening"].pop("sha256"), d["whitening"].pop("file")
        d["tuned_on"][0].pop("name")  # names the folder
    assert a == b
    np.testing.assert_array_equal(Recipe.load(out).learned.proj, Recipe.load(recipe).learned.proj)


def test_cli_errors_are_one_line_exit_2_and_write_nothing(photos, cache, tmp_path, capsys):
    from cbir.cli import main

    out = tmp_path / "r.json"

    def fails(args, needle):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not out.exists() and not out.with_name("r.whiten.npz").exists()

    fails(["adapt", str(tmp_path / "missing"), "--out", str(out)], "photo folder not found")
    two = tmp_path / "two"
    two.mkdir()
    for name in PHOTOS[:2]:
        shutil.copy(photos / f"{name}.jpg", two)
    fails(["adapt", str(two), "--out", str(out), "--cache", str(cache), *OPTS], "at least 3")
    fails(["adapt", str(photos), "--out", str(out), *OPTS, "--lw-shrinkage", "2"],
          "--lw-shrinkage: must be a finite number in [0, 1]")
    fails(["adapt", str(photos), "--out", str(out), *OPTS, "--k", "0"], "--k: must be an integer in [1, 1000]")
    fails(["adapt", str(photos), "--out", str(tmp_path / "r.txt")], ".json")
    fails(["adapt", str(photos), "--out", str(tmp_path / "no" / "r.json")], "does not exist")


def test_too_few_verified_pairs_is_refused(photos, cache, tmp_path, capsys):
    """4 photos of different places, none verifies: one line, nothing written (library: TooFewPairs)."""
    few = tmp_path / "few"
    few.mkdir()
    for name in PHOTOS[::2] + ["paris_defense_000015", "paris_defense_000037"]:
        shutil.copy(DEMO / f"{name}.jpg", few)
    with pytest.raises(TooFewPairs, match="verified pair"):
        adapt(few, _settings(), cache_dir=cache, device="cpu")
    from cbir.cli import main

    out = tmp_path / "r.json"
    assert main(["adapt", str(few), "--out", str(out), "--cache", str(cache), *OPTS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verified pair" in err[0] and "at least 3 pairs" in err[0]
    assert not out.exists() and not out.with_name("r.whiten.npz").exists()


def test_help_teaches():
    p = run_cli("adapt", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for needle in ("--recipe RECIPE.json", "pseudo ground truth", "no ground-truth file", "--verify 100",
                   "learned on one fold", "cbir adapt photos/ --out photos.recipe.json", "--lw-dim", "--tune-verify"):
        assert needle in text, needle


def test_tune_verify_tries_spatial_verification(adapted, photos, cache):
    """With ``verify`` the search also scores verification of the top K (a verifier over the local
    features of the photos, through the cache), after the re-ranking steps."""
    s = _settings().model_copy(update={"verify": True})
    recipe, report = adapt(photos, s, cache_dir=cache, device="cpu")
    steps = [t for t in report.trials if t.get("step") == "verify"]
    assert len(steps) == 1 and "objective" in steps[0] and steps[0]["verify"]["k"] == 50
    assert recipe.spec.method == "lw"
