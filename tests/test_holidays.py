"""INRIA Holidays: the official rule (group = id // 100, NNNN00 the query, query out of its own
ranking), its mAP by hand, the shared gnd_holidays805.pkl, manual rotations, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.datasets import holidays_ground_truth, load_dataset, load_holidays

SHARED = Path(os.environ.get("CBIR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
IDS = ["100000", "100001", "100002", "100100", "100101", "100200", "100301"]


def _folder(tmp_path: Path, ids=IDS) -> Path:
    root = tmp_path / "holidays" / "jpg"
    root.mkdir(parents=True)
    for i, name in enumerate(ids):
        Image.new("RGB", (40, 30), (i * 30 % 255, 80, 160)).save(root / f"{name}.jpg")
    return tmp_path


def test_official_rule_by_hand():
    qrows, gnd = holidays_ground_truth(IDS)
    # 100200 is alone (no positive: no AP), 100301's group has no query image
    assert [IDS[q] for q in qrows] == ["100000", "100100"]
    assert [sorted(IDS[j] for j in g["easy"]) for g in gnd] == [["100001", "100002"], ["100101"]]
    assert [[IDS[j] for j in g["junk"]] for g in gnd] == [["100000"], ["100100"]]
    assert all(g["hard"] == [] for g in gnd)


def test_holidays_map_by_hand(tmp_path):
    ds = load_holidays(_folder(tmp_path))
    col = {n: i for i, n in enumerate(ds.db_ids)}
    scores = np.zeros((2, len(IDS)))
    # query 100000: itself first (left out), then 100001, 100100, 100002, ...
    for rank, name in enumerate(["100000", "100001", "100100", "100002", "100101", "100200", "100301"]):
        scores[0, col[name]] = 10 - rank
    # query 100100: itself, then its one positive
    for rank, name in enumerate(["100100", "100101", "100000", "100001", "100002", "100200", "100301"]):
        scores[1, col[name]] = 10 - rank
    # holidays_map.py: AP = sum over positives of (p_before + p_after) / 2 * 1/npos, ranks without the query
    # query 1: positives at 0-based ranks 0 and 2 -> (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 0.791667; query 2: 1
    want = 100 * (0.5 + (0.5 + 2 / 3) / 4 + 1.0) / 2
    res = ds.evaluate(scores)
    assert res["mAP"]["medium"] == pytest.approx(want, abs=1e-6)
    assert res["mAP"]["easy"] == pytest.approx(want, abs=1e-6)


def test_same_as_shared_gnd_holidays805():
    gnd_file = SHARED / "data" / "holidays-805" / "gnd_holidays805.pkl"
    if not gnd_file.is_file():
        pytest.skip(f"shared data not found: {gnd_file}")
    from cbir.datasets import load_gnd

    ref = load_gnd(gnd_file)
    ds = load_holidays(gnd_file.parent)
    assert ds.db_ids == list(ref["imlist"]) and ds.query_ids == list(ref["qimlist"])
    for mine, theirs in zip(ds.gnd, ref["gnd"]):
        assert sorted(mine["easy"]) == sorted(theirs["easy"])
        assert sorted(mine["junk"]) == sorted(theirs["junk"]) and list(theirs["hard"]) == []


def test_manual_rotations(tmp_path):
    root = _folder(tmp_path)
    (root / "holidays" / "rotations.txt").write_text("# id degrees\n100001 90\n100101,270\n")
    ds = load_holidays(root)
    rotated = {n: p for n, p in zip(ds.db_ids, ds.db_paths) if "jpg_rotated" in str(p)}
    assert sorted(rotated) == ["100001", "100101"]
    assert Image.open(rotated["100001"]).size == (30, 40)
    assert Image.open(root / "holidays" / "jpg" / "100001.jpg").size == (40, 30)  # originals untouched
    assert ds.info["rotations"]["rotated"] == 2
    (root / "holidays" / "rotations.txt").write_text("999999 90\n")
    with pytest.raises(ValueError, match="999999"):
        load_holidays(root)


def test_cli_evaluate_dataset_holidays(tmp_path, capsys):
    from cbir.cli import main
    from cbir.descriptors import Descriptors

    root = _folder(tmp_path)
    angle = {"100000": 0.0, "100001": 0.1, "100100": 0.2, "100101": 0.21, "100002": 0.3, "100200": 1.0, "100301": 1.5}
    x = np.array([[np.cos(angle[n]), np.sin(angle[n])] for n in IDS], dtype=np.float32)
    Descriptors(ids=IDS, vectors=x).save(tmp_path / "f")
    out = tmp_path / "r.json"
    assert main(["evaluate", "--dataset", "holidays", "--data-root", str(root), "--features", str(tmp_path / "f"),
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    # query 100000: 100001 (+), 100100, 100101, 100002 (+) -> AP = (1+1)/4 + (1/3 + 2/4)/4; query 100100: 1
    want = 100 * ((0.5 + (1 / 3 + 2 / 4) / 4) + 1.0) / 2
    medium = res["mAP"]["medium"] if "mAP" in res else res["results"]["mAP"]["medium"]
    assert medium == pytest.approx(want, abs=1e-3)


def test_download_knows_holidays():
    from cbir.datasets.download import DOWNLOADABLE, _files

    assert "holidays" in DOWNLOADABLE
    urls = [r.url for r in _files("holidays")]
    assert [u.rsplit("/", 1)[1] for u in urls] == ["jpg1.tar.gz", "jpg2.tar.gz"]


def test_unknown_layout_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cbir download holidays"):
        load_dataset("holidays", tmp_path)
