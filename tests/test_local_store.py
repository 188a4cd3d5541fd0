"""LocalFeatureStore and extract_to_store: sharded, resumable, atomic, versioned, safe to read."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cbir.fileio import FormatError
from cbir.local.features import LocalFeatures, LocalFeatureSettings, extract_local
from cbir.local.store import LocalFeatureStore, extract_to_store

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"
PHOTOS = sorted(DEMO.glob("*.jpg"))[:7]
TINY = LocalFeatureSettings(max_size=96, max_features=64)


def _fake(n: int, seed: int, size=(40, 30)) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    kp = rng.uniform(0, 30, size=(n, 4)).astype(np.float32)
    return LocalFeatures(kp, rng.integers(0, 256, size=(n, 128), dtype=np.uint8), size, 1.5)


def _same(a: LocalFeatures, b: LocalFeatures) -> bool:
    return (np.array_equal(a.keypoints, b.keypoints) and np.array_equal(a.descriptors, b.descriptors)
            and a.size == b.size and a.scale == b.scale)


def _content(store: LocalFeatureStore) -> dict:
    return {k: store.get(k) for k in store.keys()}


def test_round_trip_keys_counts_and_reopen(tmp_path):
    store = LocalFeatureStore(tmp_path / "s", TINY)
    feats = {f"img{i}": _fake(n, i) for i, n in enumerate([5, 0, 12])}
    assert store.add(feats, {"broken": "file not found"}) == 3
    store.add({"img9": _fake(3, 9)})
    for s in (store, LocalFeatureStore(tmp_path / "s")):
        assert s.keys() == ["img0", "img1", "img2", "img9"] and len(s) == 4
        assert "img1" in s and "broken" not in s and s.failed == {"broken": "file not found"}
        assert all(_same(s.get(k), f) for k, f in feats.items())
        assert s.count("img2") == 12 and s.settings == TINY
    with pytest.raises(KeyError, match="nope"):
        store.get("nope")
    with pytest.raises(KeyError, match="already"):
        store.add({"img0": _fake(2, 0)})
    store.add({"img0": _fake(2, 77)}, replace=True)
    assert _same(LocalFeatureStore(tmp_path / "s").get("img0"), _fake(2, 77))
    with pytest.raises(ValueError, match="not sift"):
        LocalFeatureStore(tmp_path / "s", LocalFeatureSettings())
    with pytest.raises(FileNotFoundError, match="no manifest"):
        LocalFeatureStore(tmp_path / "missing")


def test_remove_rewrites_only_what_it_must(tmp_path):
    store = LocalFeatureStore(tmp_path / "s", TINY)
    store.add({"a": _fake(3, 1), "b": _fake(4, 2)})
    store.add({"c": _fake(5, 3)}, {"bad": "not an image"})
    assert store.remove(["a", "zzz", "bad"]) == 1
    again = LocalFeatureStore(tmp_path / "s")
    assert again.keys() == ["b", "c"]  # the rewritten shard keeps its place
    assert _same(again.get("b"), _fake(4, 2)) and again.failed == {}
    assert store.remove(["b", "c"]) == 2 and len(LocalFeatureStore(tmp_path / "s")) == 0
    # nothing left behind but the manifest's (empty) list
    assert not any(p.suffix == ".npy" for p in (tmp_path / "s" / "shards").iterdir())


def test_extract_to_store_resumes_after_a_crash_to_the_same_content(tmp_path, monkeypatch):
    keys = [p.stem for p in PHOTOS]
    boxes = [None] * len(PHOTOS)
    boxes[2] = (10, 10, 90, 70)
    full = extract_to_store(PHOTOS, keys, TINY, tmp_path / "full", bboxes=boxes, shard_size=2, device="cpu")
    assert full["extracted"] == len(keys) and full["skipped"] == 0

    calls = {"n": 0}
    real_add = LocalFeatureStore.add

    def crash_on_second_shard(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed between shards")
        return real_add(self, *a, **kw)

    monkeypatch.setattr(LocalFeatureStore, "add", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(PHOTOS, keys, TINY, tmp_path / "resumed", bboxes=boxes, shard_size=2, device="cpu")
    monkeypatch.setattr(LocalFeatureStore, "add", real_add)
    part = LocalFeatureStore(tmp_path / "resumed")
    assert len(part) == 4  # two shards made it
    seen = []
    res = extract_to_store(PHOTOS, keys, None, tmp_path / "resumed", bboxes=boxes, shard_size=2, device="cpu",
                           progress=seen.append)
    assert res["skipped"] == 4 and res["extracted"] == len(keys) - 4 and sum(seen) == len(keys)
    a, b = _content(LocalFeatureStore(tmp_path / "full")), _content(LocalFeatureStore(tmp_path / "resumed"))
    assert sorted(a) == sorted(b) == sorted(keys)
    assert all(_same(a[k], b[k]) for k in keys)
    # the crop box was used, and the features equal a direct extraction
    assert _same(a[keys[2]], extract_local(PHOTOS[2], TINY, boxes[2], device="cpu"))
    # a finished run does nothing the second time
    assert extract_to_store(PHOTOS, keys, None, tmp_path / "full", device="cpu")["extracted"] == 0


def test_failed_images_are_noted_not_raised_and_not_retried(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    res = extract_to_store([PHOTOS[0], bad], ["ok", "bad"], TINY, tmp_path / "s", device="cpu")
    assert res["failed"] == {"bad": "not an image (unknown or corrupt format)"}
    store = LocalFeatureStore(tmp_path / "s")
    assert "bad" not in store and store.failed == res["failed"]
    assert extract_to_store([PHOTOS[0], bad], ["ok", "bad"], None, store, device="cpu")["extracted"] == 0
    bad.write_bytes(PHOTOS[1].read_bytes())  # fixed: retried on request
    res = extract_to_store([PHOTOS[0], bad], ["ok", "bad"], None, store, device="cpu", retry_failed=True)
    assert res["extracted"] == 1 and "bad" in store and store.failed == {}


def test_two_worker_processes_give_the_same_features(tmp_path):
    keys = [p.stem for p in PHOTOS[:4]]
    one = extract_to_store(PHOTOS[:4], keys, TINY, tmp_path / "one", device="cpu")["store"]
    two = extract_to_store(PHOTOS[:4], keys, TINY, tmp_path / "two", device="cpu", workers=2)["store"]
    assert one.keys() == two.keys()
    assert all(_same(one.get(k), two.get(k)) for k in keys)


def test_orphan_shards_of_a_crash_are_ignored_then_removed(tmp_path):
    store = LocalFeatureStore(tmp_path / "s", TINY)
    store.add({"a": _fake(3, 1)})
    shards = tmp_path / "s" / "shards"
    # a shard written but never listed (the crash came before the manifest), and a temporary file
    for p in list(shards.iterdir()):
        (shards / p.name.replace("00000000", "00000099")).write_bytes(p.read_bytes())
    (shards / ".00000100.json.x1y2.tmp").write_text("half")
    again = LocalFeatureStore(tmp_path / "s")
    assert again.keys() == ["a"]
    again.add({"b": _fake(2, 2)})
    names = {p.name.split(".")[0] or p.name for p in shards.iterdir()}
    assert "00000099" not in names and not any(p.name.endswith(".tmp") for p in shards.iterdir())


def test_a_failed_write_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    import cbir.local.store as mod

    store = LocalFeatureStore(tmp_path / "s", TINY)
    store.add({"a": _fake(3, 1)})
    real = mod.atomic_save_npy

    def fail_on_descriptors(path, arr):
        if str(path).endswith("descriptors.npy"):
            raise OSError("disk full")
        return real(path, arr)

    monkeypatch.setattr(mod, "atomic_save_npy", fail_on_descriptors)
    with pytest.raises(OSError, match="disk full"):
        store.add({"b": _fake(2, 2)})
    monkeypatch.setattr(mod, "atomic_save_npy", real)
    again = LocalFeatureStore(tmp_path / "s")
    assert again.keys() == ["a"] and _same(again.get("a"), _fake(3, 1))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "s" / "shards").iterdir())


# ---------------------------------------------------------------------------------------------
# crafted files: refused in one line naming the file, and no code runs


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_shard_store(tmp_path: Path) -> tuple[Path, Path]:
    store = LocalFeatureStore(tmp_path / "s", TINY)
    store.add({"a": _fake(3, 1), "b": _fake(2, 2)})
    shard = next((tmp_path / "s" / "shards").glob("*.json"))
    return tmp_path / "s", shard


def _refused(path: Path, name: str, match: str) -> None:
    with pytest.raises(FormatError) as err:
        st = LocalFeatureStore(path)
        st.get("a")
        st.get("b")
    text = str(err.value)
    assert name in text and "\n" not in text and match in text


def test_a_pickle_inside_a_shard_array_runs_no_code(tmp_path):
    root, shard = _one_shard_store(tmp_path)
    marker = tmp_path / "pwned"
    kp_path = shard.with_name(shard.name.replace(".json", ".keypoints.npy"))
    np.save(kp_path, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    _refused(root, kp_path.name, "not a readable local feature array")
    assert not marker.exists()
    # the control: plain pickle would have run it
    pickle.loads(pickle.dumps(_Payload(str(marker))))
    assert marker.exists()


@pytest.mark.parametrize("case", ["dtype", "rows", "nan", "json-types", "json-lengths", "manifest", "version"])
def test_crafted_or_damaged_shards_are_refused(tmp_path, case):
    root, shard = _one_shard_store(tmp_path)
    kp_path = shard.with_name(shard.name.replace(".json", ".keypoints.npy"))
    desc_path = shard.with_name(shard.name.replace(".json", ".descriptors.npy"))
    doc = json.loads(shard.read_text())
    if case == "dtype":
        np.save(desc_path, np.load(desc_path).astype(np.float64))
        _refused(root, desc_path.name, "uint8")
    elif case == "rows":
        np.save(kp_path, np.load(kp_path)[:-1])
        _refused(root, kp_path.name, "expected a (5, 4) float32 array")
    elif case == "nan":
        kp = np.load(kp_path)
        kp[4, 0] = np.nan  # an image of "b"
        np.save(kp_path, kp)
        st = LocalFeatureStore(root)
        assert _same(st.get("a"), _fake(3, 1))  # other images stay readable
        _refused(root, kp_path.name, "NaN")
        with pytest.raises(FormatError, match="NaN"):
            st.validate()
    elif case == "json-types":
        doc["counts"] = ["3", 2]
        shard.write_text(json.dumps(doc))
        _refused(root, shard.name, "not a valid local feature shard")
    elif case == "json-lengths":
        doc["sizes"] = doc["sizes"][:1]
        shard.write_text(json.dumps(doc))
        _refused(root, shard.name, "not a valid local feature shard")
    elif case == "manifest":
        m = json.loads((root / "manifest.json").read_text())
        m["settings"]["max_size"] = "huge"
        (root / "manifest.json").write_text(json.dumps(m))
        _refused(root, "manifest.json", "bad local feature store manifest")
    elif case == "version":
        m = json.loads((root / "manifest.json").read_text())
        m["format_version"] = 99
        (root / "manifest.json").write_text(json.dumps(m))
        _refused(root, "manifest.json", "not supported")


def test_driver_checks_its_inputs(tmp_path):
    with pytest.raises(ValueError, match="2 paths for 1 keys"):
        extract_to_store(PHOTOS[:2], ["a"], TINY, tmp_path / "s")
    with pytest.raises(ValueError, match="'a' is given twice"):
        extract_to_store(PHOTOS[:2], ["a", "a"], TINY, tmp_path / "s")
    with pytest.raises(ValueError, match="not sift-1024px"):
        extract_to_store(PHOTOS[:1], ["a"], LocalFeatureSettings(), LocalFeatureStore(tmp_path / "t", TINY))
    with pytest.raises(ValueError, match="local-feature device"):
        extract_to_store(PHOTOS[:1], ["a"], TINY, tmp_path / "u", device="tpu")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        LocalFeatureStore(tmp_path / "file", TINY)
