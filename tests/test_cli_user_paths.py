"""The paths a new user walks (issue 13): one-line errors, no work thrown away, nothing described
twice, shared options, and the small messages."""

from __future__ import annotations

import json
import shutil
import socket
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from cbir.cli import main
from cbir.datasets import demo_root
from cbir.descriptors import Descriptors
from conftest import toy_benchmark

PHOTOS = sorted((demo_root() / "jpg").glob("*.jpg"))


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture()
def feats(tmp_path, capsys):
    """`cbir extract` of three demo photos (tiny size) and the photo folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in PHOTOS[:3]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "feats"
    rc, _, err = run(capsys, "extract", folder, "--out", out, "--imsize", "64", "--scales", "1", "--quiet")
    assert rc == 0, err
    return folder, out


def test_version_reads_the_package_metadata(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"cbir {version('cbir')}"


def test_offline_weights_fail_fast_with_one_line(tmp_path, capsys, monkeypatch):
    """No network: the hub client is put offline after one quick probe instead of retrying ~50 s."""
    import huggingface_hub.constants as hf

    from cbir import networks, weights

    probes, offline_at_load, connects, sleeps = [], [], [], []
    monkeypatch.setattr(weights, "hub_reachable", lambda *a, **k: probes.append(a) or False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    real_net = networks.timm_net

    def timm_net(arch, pretrained):
        offline_at_load.append(hf.HF_HUB_OFFLINE)
        return real_net(arch, pretrained)

    monkeypatch.setattr(networks, "timm_net", timm_net)
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect",
                        lambda self, addr: connects.append(addr) or real_connect(self, addr))
    monkeypatch.setattr(time, "sleep", lambda s: sleeps.append(s))  # the hub client's back-off would sleep
    rc, _, err = run(capsys, "extract", PHOTOS[0], "--out", tmp_path / "x", "--model", "resnet10t")
    assert len(probes) == 1 and offline_at_load == [True]  # one probe, then the hub client is offline
    assert connects == [] and sleeps == []  # so it neither connects nor retries
    assert rc == 2 and "could not download pretrained weights" in err and "--weights FILE" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert hf.HF_HUB_OFFLINE is False  # restored


def test_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["evaluate", "--gnd", str(tmp_path / "nope.pkl"), "--features", str(tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])
    with pytest.raises(FileNotFoundError):
        main([*argv, "--debug"])


def test_index_build_checks_the_output_before_any_work(tmp_path, capsys, monkeypatch):
    import cbir.index.build as build

    def no_work(*a, **k):
        raise AssertionError("described images before checking --out")

    monkeypatch.setattr(build, "build_index", no_work)
    existing = tmp_path / "some_file"
    existing.write_text("keep me")
    rc, _, err = run(capsys, "index", "build", PHOTOS[0].parent, "--out", existing)
    assert rc == 2 and "existing file" in err and existing.read_text() == "keep me"
    rc, _, err = run(capsys, "index", "build", PHOTOS[0].parent, "--out", existing / "sub.index")
    assert rc == 2 and "is a file" in err
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.txt").write_text("")
    rc, _, err = run(capsys, "index", "build", PHOTOS[0].parent, "--out", tmp_path / "folder")
    assert rc == 2 and "not a cbir index" in err
    rc, _, err = run(capsys, "index", "build", PHOTOS[0].parent, "--out", tmp_path / "ix", "--pooling", "gem:4")
    assert rc == 2 and "key=value" in err


def test_index_from_extract_folder_add_features_and_duplicates(feats, tmp_path, capsys, monkeypatch):
    folder, out = feats
    ix = tmp_path / "photos.index"
    import cbir.extract as ex

    real = ex.extract
    calls = []
    monkeypatch.setattr(ex, "extract", lambda *a, **k: calls.append(1) or real(*a, **k))
    rc, stdout, err = run(capsys, "index", "build", "--features", out, "--out", ix)
    # nothing of the collection is described again; the network exported for torch-free search is
    # checked against torch on 2 indexed photos (one call)
    assert rc == 0 and "indexed 3 images" in stdout and len(calls) == 1, err
    assert "query network for fast search: exported" in err and (ix / "query-model.npz").is_file()
    desc = Descriptors.load(out)
    rc, stdout, _ = run(capsys, "index", "info", ix, "--json", "--list", "5")
    info = json.loads(stdout)
    assert info["count"] == 3 and info["settings"]["imsize"] == 64 and info["settings"]["source"]["model"]
    # --id takes the names `cbir extract` uses as ids; the stored vectors are the extracted ones
    name = desc.ids[1]
    rc, stdout, _ = run(capsys, "search", ix, "--id", name, "--top", "1", "--json", "-")
    assert rc == 0 and Path(json.loads(stdout)[0]["path"]).stem == name
    assert json.loads(stdout)[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # add the same new photo twice: described and added once, the repeat reported
    new = tmp_path / "new.jpg"
    shutil.copy(PHOTOS[5], new)
    rc, stdout, err = run(capsys, "index", "add", ix, new, new, folder / PHOTOS[0].name)
    assert rc == 0 and "added 1" in stdout and "duplicate" in err and "already indexed" in err, (stdout, err)
    # add --features: descriptors of another extract folder, nothing described
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(PHOTOS[6], more / PHOTOS[6].name)
    assert run(capsys, "extract", more, "--out", tmp_path / "more_feats", "--imsize", "64", "--scales", "1",
               "--quiet")[0] == 0
    n_calls = len(calls)
    rc, stdout, err = run(capsys, "index", "add", ix, "--features", tmp_path / "more_feats")
    assert rc == 0 and "added 1" in stdout and len(calls) == n_calls, err
    rc, stdout, _ = run(capsys, "index", "info", ix, "--json")
    assert json.loads(stdout)["count"] == 5


def test_rebuilding_over_an_index_never_reuses_its_ids(feats, tmp_path, capsys, monkeypatch):
    """`index build --out EXISTING` replaces the index, but its ids continue after every id the old
    index ever gave (removed ones included): an id never names two different images of one folder."""
    from cbir.index import Index, next_free_id, open_for_write

    folder, out = feats
    ix = tmp_path / "ix"
    assert next_free_id(ix) == 0
    assert run(capsys, "index", "build", "--features", out, "--out", ix)[0] == 0
    assert sorted(Index.load(ix).store.ids.tolist()) == [0, 1, 2] and next_free_id(ix) == 3
    with open_for_write(ix) as idx:  # highest id removed: the counter still remembers it
        idx.remove([2])
    assert next_free_id(ix) == 3
    assert run(capsys, "index", "build", "--features", out, "--out", ix)[0] == 0
    assert sorted(Index.load(ix).store.ids.tolist()) == [3, 4, 5] and next_free_id(ix) == 6
    # another writer adds while a rebuild describes: the rebuild refuses to save over it
    import cbir.index.build as build

    real = build.index_from_descriptors

    def racing(*a, **k):
        index = real(*a, **k)
        with open_for_write(ix) as other:
            other.add(np.asarray(other.store.vectors[:1]), ["/elsewhere/new.jpg"])
        return index

    monkeypatch.setattr(build, "index_from_descriptors", racing)
    rc, _, err = run(capsys, "index", "build", "--features", out, "--out", ix)
    assert rc == 2 and "changed by another writer" in err and "nothing was saved" in err
    assert sorted(Index.load(ix).store.ids.tolist()) == [3, 4, 5, 6]
    # a damaged index: its ids are unknown, so the rebuild says so instead of starting again at 0
    monkeypatch.setattr(build, "index_from_descriptors", real)
    for gen in ix.glob("g*"):
        (gen / "meta.sqlite").unlink()
    rc, _, err = run(capsys, "index", "build", "--features", out, "--out", ix)
    assert rc == 2 and "damaged index" in err and "delete it or give a new path" in err


def test_a_model_file_extracts_at_its_backbones_default_size(feats, tmp_path, capsys):
    """A model file saved from Lite0 (e.g. by `cbir train`) gets Lite0's default size (512 px x 3
    scales, `cbir models`), not the generic 1024 px; given options still win."""
    import argparse

    from cbir.backbones import default_resolution
    from cbir.cli.options import extraction
    from cbir.model import build_model, save_model

    folder, _ = feats
    file = tmp_path / "mine.pt"
    save_model(build_model("efficientnet_lite0", "gem", weights="none"), file)
    want = default_resolution("efficientnet_lite0")
    assert want[0] == 512
    assert extraction(argparse.Namespace(model=str(file), imsize=None, scales=None)) == want
    assert extraction(argparse.Namespace(model=str(file), imsize=300, scales="1")) == (300, (1.0,))
    ix = tmp_path / "ix"
    rc, _, err = run(capsys, "index", "build", folder, "--model", file, "--out", ix, "--scales", "1")
    assert rc == 0, err
    rc, stdout, _ = run(capsys, "index", "info", ix, "--json")
    assert json.loads(stdout)["settings"]["imsize"] == 512
    rc, _, err = run(capsys, "index", "build", folder, "--model", tmp_path / "missing.pt", "--out", tmp_path / "ix2")
    assert rc == 2 and "missing.pt" in err and len(err.strip().splitlines()) == 1


def test_search_says_what_is_wrong(feats, tmp_path, capsys):
    folder, out = feats
    rc, _, err = run(capsys, "search", out, "--id", "1")
    assert rc == 2 and "descriptors from `cbir extract`" in err and "index build --features" in err
    ix = tmp_path / "ix"
    assert run(capsys, "index", "build", "--features", out, "--out", ix)[0] == 0
    rc, out, err = run(capsys, "search", ix, "--image", folder, "--top", "1")  # a folder: each of its images
    assert rc == 0 and out.count("query: ") == 3, (out, err)
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "search", ix, "--image", tmp_path / "empty")
    assert rc == 2 and "folder without images" in err
    rc, _, err = run(capsys, "search", ix, "--id", "no_such_name")
    assert rc == 2 and "no indexed image is named" in err


def test_resumed_complete_extract_says_so(feats, capsys):
    folder, out = feats
    rc, stdout, _ = run(capsys, "extract", folder, "--out", out, "--imsize", "64", "--scales", "1", "--quiet")
    assert rc == 0 and "already complete" in stdout and "nothing described" in stdout


def test_evaluate_images_hits_the_cache_and_takes_pooling_params(tmp_path, capsys, monkeypatch):
    gnd = toy_benchmark(tmp_path)
    from cbir.cache import describe as cached

    calls = []
    real = cached._run_extract
    monkeypatch.setattr(cached, "_run_extract", lambda m, p, **k: calls.append(len(p)) or real(m, p, **k))
    argv = ["evaluate", "--gnd", gnd, "--images", tmp_path / "jpg", "--weights", "none", "--pooling", "gem:p=4",
            "--imsize", "32", "--scales", "1", "--cache-dir", tmp_path / "cache", "--quiet", "--json", tmp_path / "r.json"]
    rc, out1, _ = run(capsys, *argv)
    assert rc == 0 and calls == [4]  # 3 database photos + 1 query, one pass
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["settings"]["pooling_params"]["p"] == pytest.approx(4.0)
    rc, out2, _ = run(capsys, *argv, "--qe", "1")
    assert rc == 0 and calls == [4] and "(cached: nothing described" in out2
    rc, _, _ = run(capsys, *argv, "--no-cache")
    assert rc == 0 and calls == [4, 4]


def test_evaluate_features_names_the_descriptors(tmp_path, capsys):
    gnd = toy_benchmark(tmp_path)
    vec = {"q": [1, 0, 0], "a": [0.9, 0.1, 0], "b": [0.7, 0.7, 0], "c": [0.5, 0.2, 0.8]}
    Descriptors(ids=list(vec), vectors=np.array(list(vec.values()), np.float32),
                meta={"model": "efficientnet_lite0", "pooling": "gem"}).save(tmp_path / "f")
    rc, out, _ = run(capsys, "evaluate", "--gnd", gnd, "--features", tmp_path / "f")
    line = next(ln for ln in out.splitlines() if ln.startswith("descriptors:"))
    assert rc == 0 and "descriptors: descriptors" not in out and str(tmp_path / "f") in line
    assert "efficientnet_lite0" in line


def test_whiten_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["whiten", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and text.count("(default: all)") == 1
