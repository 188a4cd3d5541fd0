"""`cbir index build/add/remove/info` and `cbir search` end to end (in-process CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cbir.cli import main
from cbir.index import Index
from cbir.index.embed import model_settings

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"
SOURCE = {"model": "efficientnet_lite0", "pooling": "gem", "weights": "default", "pooling_kw": {}}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_build_info_search_add_remove(tmp_path, capsys):
    photos = sorted(DEMO.glob("*.jpg"))
    if len(photos) < 6:
        pytest.skip(f"bundled demo photos not found in {DEMO}")
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for p in photos[:3]:
        shutil.copy(p, folder / p.name)
    shutil.copy(photos[3], folder / "sub" / photos[3].name)  # folders are searched recursively
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    ix = tmp_path / "photos.index"

    rc, out, err = run(capsys, "index", "build", folder, "--out", ix, "--imsize", "96", "--scales", "1")
    assert rc == 0  # one unreadable image: reported, the rest indexed (issue 13: exit 0, report the skip)
    assert "broken.jpg" in err and "indexed 4 images (1 skipped" in out

    rc, out, _ = run(capsys, "index", "info", ix, "--json", "--list", "10")
    info = json.loads(out)
    assert rc == 0 and info["count"] == 4 and info["type"] == "exact" and info["dim"] == 1280
    s = info["settings"]
    assert (s["model"], s["pooling"], s["imsize"], s["scales"]) == ("efficientnet_lite0", "gem", 96, [1.0])
    assert sorted(Path(r["path"]).name for r in info["images"]) == sorted(p.name for p in photos[:4])

    q = folder / photos[1].name
    rc, out, _ = run(capsys, "search", ix, "--image", q, "--top", "3", "--json", tmp_path / "res.json")
    res = json.loads((tmp_path / "res.json").read_text())
    assert rc == 0 and len(res) == 3 and set(res[0]) == {"id", "path", "score"}
    # the query is described in fp32 by the exported network (ONNX Runtime, no torch); the index's
    # descriptors were made under precision "auto" (bf16 on AMX CPUs): the same photo scores >= 0.999
    assert res[0]["path"] == str(q.resolve()) and res[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert (ix / "query-model.npz").is_file()
    assert [r["score"] for r in res] == sorted((r["score"] for r in res), reverse=True)
    # the printed table has a header, then the same ranking
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "id", "path"]
    assert [line.split()[2] for line in lines[1:]] == [str(r["id"]) for r in res]

    rc, out, err = run(capsys, "index", "add", ix, photos[4], folder / photos[0].name)
    assert rc == 0 and "added 1, updated 0" in out and "already indexed" in err
    rc, out, _ = run(capsys, "index", "remove", ix, "0")
    assert rc == 0 and "index has 4 images" in out
    back = Index.load(ix)
    assert len(back) == 4 and 0 not in back.store and back.id_of_path(str(photos[4].resolve())) == 4
    rc, _, err = run(capsys, "index", "remove", ix, "0")
    assert rc == 2 and "image id 0 is not in the index" in err


@pytest.fixture()
def paris_index(tmp_path, rparis250, rparis250_gnd, rparis250_lite0):
    from cbir.model import build_model

    settings = model_settings(build_model("efficientnet_lite0", pooling="gem"), SOURCE, 512, (1.0,))
    idx = Index(1280, "exact", settings=settings, device="cpu")
    idx.add(rparis250_lite0["db"], [str(rparis250 / "jpg" / f"{n}.jpg") for n in rparis250_gnd["imlist"]])
    idx.save(tmp_path / "paris.index")
    return idx, tmp_path / "paris.index"


@pytest.mark.slow
def test_search_image_with_box_equals_library(paris_index, rparis250, rparis250_gnd, rparis250_lite0, capsys, tmp_path):
    idx, ix = paris_index
    qi = 4
    qname, g = rparis250_gnd["qimlist"][qi], rparis250_gnd["gnd"][qi]
    box = ",".join(f"{v:g}" for v in g["bbx"])
    rc, out, _ = run(capsys, "search", ix, "--image", rparis250 / "jpg" / f"{qname}.jpg", "--bbox", box,
                     "--top", "10", "--json", "-")
    got = json.loads(out)
    want = idx.search(rparis250_lite0["q"][qi], 10)[0]
    assert rc == 0 and [h["id"] for h in got[:5]] == [h.id for h in want[:5]]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], atol=2e-3)
    positives = {rparis250_gnd["imlist"][i] for i in g["easy"] + g["hard"]}
    assert Path(got[0]["path"]).stem in positives


def test_search_by_id_with_query_expansion(paris_index, capsys):
    idx, ix = paris_index
    ids, x = idx.vectors()
    k = 3
    # average query expansion by hand: q' = normalise(q + sum of its top-k database vectors)
    q = x[5]
    top = np.argsort(-(x @ q), kind="stable")[:k]
    q2 = q + x[top].sum(0)
    q2 /= np.linalg.norm(q2)
    want = np.argsort(-(x @ q2), kind="stable")[:10]
    rc, out, err = run(capsys, "search", ix, "--id", "5", "--qe", str(k), "--alpha-qe", "0", "--top", "10", "--json", "-")
    got = json.loads(out)
    assert rc == 0 and '"qe"' in err
    assert [h["id"] for h in got] == ids[want].tolist()
    np.testing.assert_allclose([h["score"] for h in got], x[want] @ q2, atol=1e-4)
    # without re-ranking the plain ranking comes back, and it differs from the expanded one
    rc, out, _ = run(capsys, "search", ix, "--id", "5", "--top", "10", "--json", "-")
    plain = [h["id"] for h in json.loads(out)]
    assert plain == ids[np.argsort(-(x @ q), kind="stable")[:10]].tolist()


def test_clear_errors(paris_index, tmp_path, capsys):
    _, ix = paris_index
    cases = [
        (["search", tmp_path / "nope.index", "--id", "1"], "index not found"),
        (["search", ix, "--id", "1", "--bbox", "1,2,3,4"], "--bbox applies to --image"),
        (["search", ix, "--image", tmp_path / "missing.jpg"], "query image not found"),
        (["search", ix, "--image", tmp_path / "missing.jpg", "--bbox", "5,5,1,1"], "--bbox must be"),
        (["search", ix, "--id", "1", "--top", "0"], "--top must be at least 1"),
        (["search", ix, "--id", "99999"], "image id 99999 is not in the index"),
        (["index", "info", tmp_path], "index manifest not found"),
    ]
    for argv, message in cases:
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and message in err, (argv, err)
