"""The sharded descriptor store: shards <-> single file round trip, ShardedArray indexing, chunks,
and an interrupted extraction that resumes to bit-identical shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbir.descriptors import Descriptors, ShardedArray
from cbir.fileio import FormatError

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"


def _desc(n=23, d=5, dtype=np.float32) -> Descriptors:
    rng = np.random.default_rng(0)
    return Descriptors(ids=[f"im{i:03d}" for i in range(n)], vectors=rng.standard_normal((n, d)).astype(dtype),
                       meta={"model": "m", "imsize": 64}, failed=[{"path": "x.jpg", "reason": "empty file"}])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_single_file_to_shards_and_back(tmp_path, dtype):
    d = _desc(dtype=dtype)
    d.save(tmp_path / "one")
    one = Descriptors.load(tmp_path / "one")
    one.save(tmp_path / "sh", shard_size=7)  # convert: 7 + 7 + 7 + 2 rows
    assert sorted(p.name for p in (tmp_path / "sh" / "shards").glob("*.npy")) == [
        "000000000000.npy", "000000000007.npy", "000000000014.npy", "000000000021.npy"]
    sh = Descriptors.load(tmp_path / "sh")
    assert isinstance(sh.vectors, ShardedArray) and sh.vectors.shape == (23, 5) and sh.vectors.dtype == dtype
    assert sh.ids == d.ids and sh.failed == d.failed and sh.meta["model"] == "m" and sh.meta["imsize"] == 64
    np.testing.assert_array_equal(np.asarray(sh.vectors), d.vectors)
    sh.save(tmp_path / "back")  # and back to one file: bit-identical
    back = Descriptors.load(tmp_path / "back")
    assert isinstance(back.vectors, np.ndarray) and back.ids == d.ids and back.failed == d.failed
    np.testing.assert_array_equal(back.vectors, d.vectors)
    assert "shards" not in json.loads((tmp_path / "back" / "meta.json").read_text())
    # re-saving a folder in the other layout leaves no file of the first behind
    one.save(tmp_path / "one", shard_size=10)
    assert not (tmp_path / "one" / "descriptors.npy").exists()
    np.testing.assert_array_equal(np.asarray(Descriptors.load(tmp_path / "one").vectors), d.vectors)
    assert isinstance(Descriptors.load(tmp_path / "sh", mmap=False).vectors, np.ndarray)


def test_sharded_array_indexes_like_the_matrix(tmp_path):
    d = _desc(n=30, d=4)
    d.save(tmp_path / "sh", shard_size=4)
    a, x = Descriptors.load(tmp_path / "sh").vectors, d.vectors
    rows = np.array([29, 0, 3, 4, 4, 17, -1])
    mask = np.arange(30) % 3 == 0
    for got, want in [(a[5], x[5]), (a[-2], x[-2]), (a[3:9], x[3:9]), (a[:], x), (a[28:40], x[28:40]),
                      (a[1:20:3], x[1:20:3]), (a[rows], x[rows]), (a[mask], x[mask]), (a[rows, 1:3], x[rows, 1:3]),
                      (a.astype(np.float64), x.astype(np.float64)), (a.T, x.T), (np.asarray(a, np.float64), x)]:
        np.testing.assert_array_equal(got, want)
    assert len(a) == 30 and a.ndim == 2 and (a[2:2].shape == (0, 4))
    np.testing.assert_allclose(x[:3] @ a.T, x[:3] @ x.T, rtol=1e-6)
    chunks = list(Descriptors.load(tmp_path / "sh").iter_chunks(7))
    assert [s for s, _ in chunks] == [0, 7, 14, 21, 28]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), x)
    assert [s for s, _ in d.iter_chunks(16, dtype=np.float16)] == [0, 16]
    with pytest.raises(IndexError):
        a[np.array([30])]


def test_damaged_shard_is_a_clear_error(tmp_path):
    _desc().save(tmp_path / "sh", shard_size=10)
    info = tmp_path / "sh" / "shards" / "000000000010.json"
    meta = json.loads(info.read_text())
    info.write_text(json.dumps({**meta, "ids": meta["ids"][:3]}))
    with pytest.raises(FormatError, match="000000000010.json lists 3 ids but .*meta.json says the shard has 10 rows"):
        Descriptors.load(tmp_path / "sh")
    info.write_text(json.dumps(meta))
    (tmp_path / "sh" / "shards" / "000000000000.npy").unlink()
    with pytest.raises(FileNotFoundError, match="000000000000.npy"):
        Descriptors.load(tmp_path / "sh")


def test_extraction_resumes_to_bit_identical_shards(tmp_path, monkeypatch):
    from cbir.extract import extract_to_dir
    from cbir.extraction import loop
    from cbir.model import build_model

    model = build_model("efficientnet_lite0", pooling="gem")
    images = sorted(DEMO.glob("*.jpg"))[:5]
    kw = dict(imsize=64, scales=(1.0, 0.5), chunk=2, progress=False, precision="fp32", workers=0)
    whole = extract_to_dir(model, images, tmp_path / "whole", **kw)
    real, calls = loop.extract, []

    def dies_on_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the run
        return real(*a, **k)

    monkeypatch.setattr(loop, "extract", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract_to_dir(model, images, tmp_path / "resumed", **kw)
    assert not (tmp_path / "resumed" / "meta.json").exists()
    monkeypatch.setattr(loop, "extract", real)
    resumed = extract_to_dir(model, images, tmp_path / "resumed", **kw)
    assert resumed.ids == whole.ids == [p.stem for p in images]
    shards = sorted((tmp_path / "whole" / "shards").glob("*"))
    assert [p.name for p in shards] == [p.name for p in sorted((tmp_path / "resumed" / "shards").glob("*"))]
    for p in shards:  # bit-identical files, descriptors and ids alike
        assert p.read_bytes() == (tmp_path / "resumed" / "shards" / p.name).read_bytes(), p.name
    assert json.loads((tmp_path / "resumed" / "meta.json").read_text())["shards"] == \
        json.loads((tmp_path / "whole" / "meta.json").read_text())["shards"]


def test_chunked_topk_reads_the_shards(tmp_path):
    from cbir.topk import chunked_topk

    rng = np.random.default_rng(3)
    x = rng.standard_normal((101, 16)).astype(np.float16)
    Descriptors(ids=[str(i) for i in range(101)], vectors=x).save(tmp_path / "sh", shard_size=13)
    store = Descriptors.load(tmp_path / "sh")
    q = rng.standard_normal((4, 16)).astype(np.float32)
    scores, rows = chunked_topk(q, store.iter_chunks(17, dtype=np.float32), k=10)
    want = np.argsort(-(q @ x.astype(np.float32).T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(rows, want)
