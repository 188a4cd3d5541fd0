"""cbir.cache: every image described once per (model, weights, settings), keyed by file contents and box."""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir import pipeline
from cbir.cache import describe as cached
from cbir.cache.describe import CacheStats, DescriptorCache, extract_with_cache
from cbir.cache.digest import DigestMemo
from cbir.cache.identity import key_of, settings_identity, source_identity, spec_identity
from cbir.cache.vectors import cache_info, clear_cache, prune, store_folder
from cbir.cli import main
from cbir.extract import extract
from cbir.index.embed import source_of
from cbir.model import ModelSpec

SPEC = ModelSpec("efficientnet_lite0", "gem:p=4", "none")
KW = dict(imsize=32, scales=(1.0,), device="cpu", precision="fp32", progress=False)


@pytest.fixture
def counted(monkeypatch):
    """The number of images each extraction call sends through the network."""
    calls: list[int] = []
    real = cached._run_extract
    monkeypatch.setattr(cached, "_run_extract", lambda m, p, **k: calls.append(len(p)) or real(m, p, **k))
    return calls


@pytest.fixture(scope="module")
def net():
    return SPEC.build()


def photos(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    out = []
    for i in range(n):
        f = folder / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(f, quality=95)
        out.append(f)
    return out


def open_cache(root: Path, **kw) -> DescriptorCache:
    return DescriptorCache.for_spec(SPEC, imsize=32, scales=(1.0,), device="cpu", precision="fp32", root=root, **kw)


def test_digests_follow_contents_not_paths_or_times(tmp_path):
    a, b = photos(tmp_path / "img", 2)
    memo = DigestMemo(tmp_path / "cache")
    da, db = memo.digests([a, b])
    assert da != db and memo.hashed == 2
    copy = tmp_path / "elsewhere.jpg"
    shutil.copy(a, copy)
    assert memo.digest(copy) == da  # the same bytes at another path
    os.utime(a, ns=(1, 10**18))  # touched: hashed again, same digest
    assert memo.digest(a) == da
    again = DigestMemo(tmp_path / "cache")  # a second run: nothing hashed
    assert again.digests([a, b, copy]) == [da, db, da] and again.hashed == 0
    a.write_bytes(b.read_bytes())
    assert DigestMemo(tmp_path / "cache").digest(a) == db
    assert memo.digest(tmp_path / "missing.jpg") is None


def test_keys_change_with_weights_and_settings_and_nothing_else(tmp_path, net):
    w = tmp_path / "w.pth"
    w.write_bytes(b"one")
    k1 = key_of(spec_identity(ModelSpec("resnet18", "gem", str(w))))
    shutil.copy(w, tmp_path / "same.pth")
    assert key_of(spec_identity(ModelSpec("resnet18", "gem", str(tmp_path / "same.pth")))) == k1  # by content
    w.write_bytes(b"two")
    assert key_of(spec_identity(ModelSpec("resnet18", "gem", str(w)))) != k1
    base = dict(imsize=512, scales=(1.0, 0.5), precision="fp32")
    s0 = key_of(settings_identity(**base))
    assert key_of(settings_identity(**base)) == s0
    for change in ({"imsize": 500}, {"scales": (1.0,)}, {"precision": "bf16"}, {"backend": "onnxruntime"},
                   {"device_type": "cuda"}, {"decode": "cuda"}):
        assert key_of(settings_identity(**{**base, **change})) != s0, change
    with pytest.raises(ValueError):
        settings_identity(**{**base, "precision": "auto"})  # the key needs what "auto" resolved to
    assert spec_identity(ModelSpec("efficientnet_lite0", "gem:p=4")) != spec_identity(SPEC)  # weights
    assert spec_identity(ModelSpec("efficientnet_lite0", "gem:p=3", "none")) != spec_identity(SPEC)  # pooling
    # an index records its model as a "source": the same key as the ModelSpec that built it
    for spec in (SPEC, ModelSpec("efficientnet_lite0", "gem:per_channel=1", "none")):
        built = spec.build() if spec != SPEC else net
        assert source_identity(source_of(spec, built)) == spec_identity(spec)
    assert spec_identity(ModelSpec("efficientnet_lite0", "gem:per_channel=1", "none")) != spec_identity(
        ModelSpec("efficientnet_lite0", "gem", "none"))


def test_hits_by_contents_and_box(tmp_path, net, counted):
    a, b, c = photos(tmp_path / "img")
    cache = open_cache(tmp_path / "cache")
    first = extract_with_cache(net, [a, b], cache=cache, **KW)
    assert counted == [2]
    np.testing.assert_array_equal(first.vectors, extract(net, [a, b], **KW).vectors)
    copy = tmp_path / "copy.jpg"
    shutil.copy(a, copy)
    w, h = Image.open(b).size
    st = CacheStats()
    res = extract_with_cache(net, [copy, b, b, b], bboxes=[None, (0, 0, w, h), (-5, -5, w + 9, h + 9), None],
                             cache=open_cache(tmp_path / "cache"), stats=st, **KW)
    assert counted == [2] and st.hits == 4 and st.described == 0  # a whole-image box is no box
    np.testing.assert_array_equal(res.vectors, first.vectors[[0, 1, 1, 1]])
    crop = (2, 3, 20, 25)
    res = extract_with_cache(net, [b, c], bboxes=[crop, None], cache=open_cache(tmp_path / "cache"), **KW)
    assert counted == [2, 2]
    np.testing.assert_allclose(res.vectors[0], extract(net, [b], bboxes=[crop], **KW).vectors[0], atol=1e-6)
    os.utime(a, ns=(5, 5 * 10**18))  # touched, same bytes: a hit
    extract_with_cache(net, [a], cache=open_cache(tmp_path / "cache"), **KW)
    assert counted == [2, 2]
    Image.new("RGB", (30, 30), (9, 9, 9)).save(a)  # new contents: described
    extract_with_cache(net, [a], cache=open_cache(tmp_path / "cache"), **KW)
    assert counted == [2, 2, 1]
    other = DescriptorCache.for_spec(SPEC, imsize=24, scales=(1.0,), device="cpu", precision="fp32",
                                     root=tmp_path / "cache")
    extract_with_cache(net, [b], cache=other, **{**KW, "imsize": 24})  # another setting: another store
    assert counted == [2, 2, 1, 1]


def test_unreadable_inputs_are_reported_in_order(tmp_path, net, counted):
    a, b = photos(tmp_path / "img", 2)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    res = extract_with_cache(net, [a, bad, b, tmp_path / "none.jpg"], cache=open_cache(tmp_path / "c"), **KW)
    assert res.ok.tolist() == [0, 2] and [f["path"] for f in res.failed] == [str(bad), str(tmp_path / "none.jpg")]
    assert all(f["reason"] for f in res.failed)


def whole_image_benchmark(tmp_path: Path) -> Path:
    """Holidays-like: 4 photos, 2 of them also queries with a box covering the whole image."""
    ps = photos(tmp_path / "jpg", 4)
    names = [p.stem for p in ps]
    gnd = {"imlist": names, "qimlist": [names[0], names[2]],
           "gnd": [{"bbx": [0, 0, *Image.open(ps[0]).size], "easy": [1], "hard": [], "junk": [0]},
                   {"bbx": [0, 0, *Image.open(ps[2]).size], "easy": [3], "hard": [], "junk": [2]}]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    return tmp_path / "gnd.pkl"


def test_a_whole_image_query_is_described_once(tmp_path, counted):
    bench = pipeline.load_benchmark(whole_image_benchmark(tmp_path))
    q, db = pipeline.describe(bench, SPEC, imsize=32, scales=(1.0,), device="cpu")  # no cache: once within the call
    assert counted == [4] and q.meta["described"] == 4
    np.testing.assert_array_equal(q.vectors, db.vectors[[0, 2]])
    q2, _ = pipeline.describe(bench, SPEC, imsize=32, scales=(1.0,), device="cpu", cache_dir=tmp_path / "c")
    assert counted == [4, 4]
    pipeline.describe(bench, SPEC, imsize=32, scales=(1.0,), device="cpu", cache_dir=tmp_path / "c")
    assert counted == [4, 4]


def test_evaluate_then_tune_describes_nothing_the_second_time(tmp_path, capsys, counted):
    gnd = whole_image_benchmark(tmp_path)
    common = ["--weights", "none", "--imsize", "32", "--scales", "1", "--precision", "fp32"]
    assert main(["evaluate", "--gnd", str(gnd), "--images", str(tmp_path / "jpg"), *common, "--quiet"]) == 0
    assert counted == [4]
    assert "nothing described" not in capsys.readouterr().out
    assert main(["tune", "--val", str(gnd), str(tmp_path / "jpg"), "--out", str(tmp_path / "r.json"), "--fast",
                 *common]) == 0
    assert counted == [4]  # tune: every photo from the cache
    assert main(["evaluate", "--gnd", str(gnd), "--images", str(tmp_path / "jpg"), *common, "--quiet"]) == 0
    assert counted == [4] and "(cached: nothing described)" in capsys.readouterr().out


def test_damaged_entries_are_ignored_and_rewritten(tmp_path, net, counted):
    ps = photos(tmp_path / "img")
    first = extract_with_cache(net, ps, cache=open_cache(tmp_path / "c"), **KW)
    store = open_cache(tmp_path / "c").store.file
    con = sqlite3.connect(store)
    con.execute("UPDATE vectors SET vec = zeroblob(length(vec)) WHERE digest = "
                "(SELECT digest FROM vectors ORDER BY digest LIMIT 1)")  # same length, checksum now wrong
    con.commit()
    con.close()
    st = CacheStats()
    again = extract_with_cache(net, ps, cache=open_cache(tmp_path / "c"), stats=st, **KW)
    assert counted == [3, 1] and st.damaged == 1 and st.hits == 2
    np.testing.assert_array_equal(again.vectors, first.vectors)
    extract_with_cache(net, ps, cache=open_cache(tmp_path / "c"), **KW)
    assert counted == [3, 1]  # rewritten
    store.write_bytes(b"garbage, not SQLite" * 100)  # a damaged file: replaced
    extract_with_cache(net, ps, cache=open_cache(tmp_path / "c"), **KW)
    assert counted == [3, 1, 3]


def test_a_crafted_cache_file_runs_no_code(tmp_path, net, counted):
    """Rows hold raw float32 bytes read with np.frombuffer: a pickle placed there is data, never run;
    a file claiming another key or format is replaced."""
    ps = photos(tmp_path / "img", 1)
    cache = open_cache(tmp_path / "c")
    cache.store.get([])  # creates the file
    digest = cache.memo.digest(ps[0])

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    payload = pickle.dumps(Boom())
    con = sqlite3.connect(cache.store.file)
    con.execute("INSERT INTO vectors VALUES (?, '', ?, ?, ?, 0)", (digest, len(payload) // 4, payload, "x"))
    con.commit()
    con.close()
    cache.close()
    st = CacheStats()
    res = extract_with_cache(net, ps, cache=open_cache(tmp_path / "c"), stats=st, **KW)
    assert st.damaged == 1 and counted == [1] and not (tmp_path / "pwned").exists() and res.vectors.shape == (1, 1280)
    con = sqlite3.connect(open_cache(tmp_path / "c").store.file)
    con.execute("UPDATE info SET value = '{\"model\": \"something else\"}' WHERE name = 'key'")
    con.commit()
    con.close()
    extract_with_cache(net, ps, cache=open_cache(tmp_path / "c"), **KW)
    assert counted == [1, 1]  # the foreign store was replaced, not read


def test_info_prune_clear(tmp_path, net, capsys, monkeypatch):
    root = tmp_path / "c"
    extract_with_cache(net, photos(tmp_path / "img"), cache=open_cache(root), **KW)
    info = cache_info(root)
    assert len(info) == 1 and info[0]["rows"] == 3 and info[0]["key"]["settings"]["imsize"] == 32
    monkeypatch.setenv("CBIR_CACHE", str(root))
    assert main(["cache", "info"]) == 0 and "3 images" in capsys.readouterr().out
    assert prune(root, max_bytes=1) >= 1 and cache_info(root)[0]["rows"] < 3
    assert clear_cache(root) >= 0 and cache_info(root) == [] and store_folder(root).is_dir()
    work = root / "adapt-v1" / "0123456789abcdef"  # a `cbir adapt` work folder: listed, then cleared
    (work / "pairs").mkdir(parents=True)
    (work / "pairs" / "graph.npz").write_bytes(b"x" * 4096)
    assert main(["cache", "info"]) == 0 and "cbir adapt work 0123456789abcdef" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and "1 `cbir adapt` work folders" in capsys.readouterr().out
    assert not work.exists()


def test_index_build_add_and_extract_share_the_cache(tmp_path, capsys, counted):
    folder = tmp_path / "photos"
    ps = photos(folder, 3)
    common = ["--weights", "none", "--imsize", "32", "--scales", "1", "--precision", "fp32"]
    assert main(["extract", str(folder), "--out", str(tmp_path / "feats"), *common, "--quiet"]) == 0
    assert counted == [3]
    assert main(["index", "build", str(folder), "--out", str(tmp_path / "ix"), *common]) == 0
    assert counted[:1] == [3] and sum(counted[1:]) == 0  # described by `cbir extract` already
    extra = tmp_path / "more" / "copy.jpg"
    extra.parent.mkdir()
    shutil.copy(ps[0], extra)  # the same photo under another name: that photo, not a new id
    capsys.readouterr()
    assert main(["index", "add", str(tmp_path / "ix"), str(extra)]) == 0
    out, err = capsys.readouterr()
    assert "nothing to add" in out and "duplicate of id 0" in err and sum(counted[1:]) == 0
    new = photos(tmp_path / "other-photos", 1)[0]  # a new photo described once by `cbir extract`...
    assert main(["extract", str(new), "--out", str(tmp_path / "feats-new"), *common, "--quiet"]) == 0
    n = len(counted)
    assert main(["index", "add", str(tmp_path / "ix"), str(new)]) == 0  # ...is added from the cache
    assert "added 1" in capsys.readouterr().out and sum(counted[n:]) == 0
    n = len(counted)
    assert main(["extract", str(folder), "--out", str(tmp_path / "feats2"), *common, "--quiet", "--no-cache"]) == 0
    assert "3 images described" in capsys.readouterr().out and len(counted) == n  # --no-cache: the cache not used


def _writer(root: str, start: int, n: int) -> None:
    from cbir.cache.vectors import VectorCache

    store = VectorCache(root, {"model": {"m": 1}, "settings": {"s": 1}})
    for i in range(start, start + n):  # one transaction per row: many interleavings
        store.put([((f"{i:064x}", ""), np.full(8, i, np.float32))])


def test_two_processes_write_one_store(tmp_path):
    """Concurrent writers (WAL, busy timeout): every row of both arrives intact."""
    import multiprocessing as mp

    from cbir.cache.vectors import VectorCache

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, 40)) for s in (0, 40)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = VectorCache(tmp_path, {"model": {"m": 1}, "settings": {"s": 1}}).get([(f"{i:064x}", "") for i in range(80)])
    assert len(got) == 80 and all(float(v[0]) == int(k[0], 16) for k, v in got.items())
