"""cbir.index.onnx_query: an index's network exported for ONNX Runtime describes queries like torch,
is kept only under its key, and `cbir search` runs without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.extract import extract
from cbir.fileio import FormatError
from cbir.index.onnx_query import (QUERY_MODEL, OnnxQueryEncoder, QueryModel, build_query_model, load_query_model,
                                   query_model_key, save_query_model)
from cbir.index.embed import model_settings, source_of
from cbir.model import ModelSpec

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "src" / "cbir" / "data" / "demo" / "jpg"
SPEC = ModelSpec("efficientnet_lite0", "gem", "default")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def lite0():
    net = SPEC.build()
    settings = model_settings(net, source_of(SPEC, net), 160, [1.0, 2 ** -0.5, 0.5])
    settings["dim"] = net.dim
    return net, settings


@pytest.fixture(scope="module")
def exported(lite0):
    net, settings = lite0
    photos = sorted(DEMO.glob("*.jpg"))[:2]
    return build_query_model(net, settings, photos)


def test_export_is_checked_on_real_photos_and_describes_like_torch(lite0, exported, tmp_path):
    """The numpy preprocessing + ONNX graph against torch fp32 on real photos: whole, cropped,
    and an odd strip whose scales hit the 32 px minimum side."""
    net, settings = lite0
    assert exported.meta["check"]["images"] == 2 and exported.meta["check"]["min_cosine"] >= 0.999
    photos = sorted(DEMO.glob("*.jpg"))[2:5]
    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.open(photos[0]).convert("RGB").resize((300, 20)).save(strip)
    images = photos + [photos[0], strip]
    boxes = [None, None, None, (40.4, 30, 400, 260.6), None]
    ref = extract(net, images, bboxes=boxes, imsize=160, scales=settings["scales"], device="cpu", precision="fp32",
                  progress=False, strict=True).vectors
    enc = OnnxQueryEncoder(exported, imsize=160, scales=settings["scales"])
    got = np.stack([enc.encode(p, b) for p, b in zip(images, boxes)])
    assert got.shape == ref.shape and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert cosines(got, ref).min() >= 0.9999, cosines(got, ref)
    # bytes in memory are the same image as the file
    np.testing.assert_allclose(enc.encode(photos[1].read_bytes()), got[1], atol=1e-6)


def test_whitening_head_is_exported(lite0):
    net, settings = lite0
    torch.manual_seed(0)
    white = torch.nn.Linear(net.pooled_dim, 32)
    net.set_whitening(white, "test")
    try:
        settings = dict(settings, whitening=net.describe()["whitening"], dim=net.dim)
        photo = sorted(DEMO.glob("*.jpg"))[6]
        model = build_query_model(net, settings, [photo])
        assert set(model.head) == {"whiten_weight", "whiten_bias"} and model.meta["dim"] == 32
        ref = extract(net, [photo], imsize=160, scales=settings["scales"], device="cpu", precision="fp32",
                      progress=False).vectors[0]
        got = OnnxQueryEncoder(model, imsize=160, scales=settings["scales"]).encode(photo)
        assert got.shape == (32,) and float(got @ ref) >= 0.9999
    finally:
        net.set_whitening(None)


def test_kept_under_its_key_and_never_trusted_when_damaged(lite0, exported, tmp_path, monkeypatch):
    net, settings = lite0
    index = tmp_path / "ix"
    index.mkdir()
    assert load_query_model(index, settings) is None  # none yet
    assert save_query_model(index, exported) == index / QUERY_MODEL
    back = load_query_model(index, settings)
    assert back is not None and back.onnx == exported.onnx and back.key == query_model_key(settings)
    # another weights file (same name, other bytes), another pooling, another dimension: not this index's
    wfile = tmp_path / "w.pth"
    wfile.write_bytes(b"weights one")
    other = dict(settings, source=dict(settings["source"], weights=str(wfile)))
    key1 = query_model_key(other)
    wfile.write_bytes(b"weights two")
    assert query_model_key(other) != key1 and load_query_model(index, other) is None
    assert load_query_model(index, dict(settings, pooling_params={"p": 4.0})) is None
    assert load_query_model(index, dict(settings, dim=7)) is None
    # the same settings give the same key (nothing else in it: not the path of the index, not the time)
    assert query_model_key(json.loads(json.dumps(settings))) == query_model_key(settings)
    # a truncated file is ignored (and would be replaced by the next export)
    data = (index / QUERY_MODEL).read_bytes()
    (index / QUERY_MODEL).write_bytes(data[: len(data) // 2])
    assert load_query_model(index, settings) is None
    with pytest.raises(FormatError):
        QueryModel.load(index / QUERY_MODEL)


def test_a_crafted_query_model_runs_no_code(tmp_path):
    """A .npz holding a pickled object (which would run code when unpickled) is refused."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    arr = np.array([Boom()], dtype=object)
    with open(tmp_path / QUERY_MODEL, "wb") as fh:
        np.savez(fh, meta=np.array(json.dumps({"format": "cbir-query-model", "format_version": 1})), onnx=arr)
    with pytest.raises(FormatError):
        QueryModel.load(tmp_path / QUERY_MODEL)
    assert not (tmp_path / "pwned").exists()
    assert pickle  # (the object array above is a pickle inside the npz)


def _run_python(code: str, *args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), CBIR_CACHE=str(cache))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


HEAVY = "('torch', 'torchvision', 'timm', 'scipy')"
PROBE = ("import sys; from cbir.cli import main\n"
         "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
         f"print('IMPORTED', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY})), rc)")


def test_parsing_imports_no_torch(tmp_path):
    """`cbir --help`, `cbir search --help` and building the search parser import none of torch,
    torchvision, timm (nor scipy)."""
    for argv in (["--help"], ["search", "--help"], ["index", "--help"]):
        out = _run_python(PROBE, *argv, cache=tmp_path).stdout.strip().splitlines()[-1]
        assert out.startswith("IMPORTED []"), (argv, out)


@pytest.mark.slow
def test_search_with_the_exported_network_imports_no_torch(tmp_path):
    """`cbir index build` exports the network; `cbir search --image` then answers without torch, with
    the torch encoder's ranking; an index whose export was removed gets it back on its first search."""
    photos = sorted(DEMO.glob("*.jpg"))[:6]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    ix = tmp_path / "ix"
    build = _run_python(PROBE, "index", "build", folder, "--out", ix, "--imsize", "128", "--scales", "1,0.5",
                        "--precision", "fp32", cache=tmp_path / "cache")
    assert "query network for fast search: exported" in build.stderr, build.stderr
    assert (ix / QUERY_MODEL).is_file()
    q = folder / photos[2].name
    fast = _run_python(PROBE, "search", ix, "--image", q, "--top", "6", "--json", "-", cache=tmp_path / "cache")
    assert fast.stdout.strip().splitlines()[-1] == "IMPORTED [] 0", fast.stdout + fast.stderr
    slow = _run_python(PROBE, "search", ix, "--image", q, "--top", "6", "--json", "-", "--encoder", "torch",
                       cache=tmp_path / "cache")
    res_fast = json.loads(fast.stdout[: fast.stdout.rindex("IMPORTED")])
    res_slow = json.loads(slow.stdout[: slow.stdout.rindex("IMPORTED")])
    assert [r["id"] for r in res_fast] == [r["id"] for r in res_slow]
    np.testing.assert_allclose([r["score"] for r in res_fast], [r["score"] for r in res_slow], atol=1e-4)
    assert res_fast[0]["path"] == str(q.resolve()) and res_fast[0]["score"] == pytest.approx(1.0, abs=1e-4)
    (ix / QUERY_MODEL).unlink()  # an index made before the export existed
    again = _run_python(PROBE, "search", ix, "--image", q, "--top", "1", cache=tmp_path / "cache")
    assert "query network for ONNX Runtime: exported" in again.stderr and (ix / QUERY_MODEL).is_file()
