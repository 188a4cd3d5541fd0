"""cbir.fileio: atomic writes leave files with the permissions a plain write would give (issue 9.6);
the stamped .npz and the file digest every stage shares."""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest

from cbir.fileio import (
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_with,
    current_umask,
)
from cbir.fileio import FormatError, load_stamped_npz, save_stamped_npz, sha256_file


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    from cbir.descriptors import Descriptors

    assert current_umask() == umask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what any ordinary write gives
    expect = 0o666 & ~umask
    assert _mode(plain) == expect
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "a.json", {"a": 1})
    atomic_save_npy(tmp_path / "a.npy", np.zeros(3))
    atomic_write_with(tmp_path / "a.pt", lambda tmp: open(tmp, "wb").write(b"x"))
    Descriptors(["a"], np.zeros((1, 2), np.float32)).save(tmp_path / "feats")
    written = ["a.bin", "a.json", "a.npy", "a.pt"] + [f"feats/{n}" for n in os.listdir(tmp_path / "feats")]
    for name in written:
        assert _mode(tmp_path / name) == expect, (name, oct(_mode(tmp_path / name)), oct(expect))


def test_rewrite_keeps_the_existing_files_mode(tmp_path):
    p = tmp_path / "m.json"
    p.write_text("{}")
    os.chmod(p, 0o604)
    atomic_write_json(p, {"b": 2})
    assert _mode(p) == 0o604 and p.read_text().strip().startswith("{")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_stamped_npz_round_trip_and_refusals(tmp_path):
    path = tmp_path / "x.npz"
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_stamped_npz(path, {"a": a}, {"note": "hi"}, "cbir-thing", 2)
    arrays, meta = load_stamped_npz(path, "cbir-thing", (2,))
    np.testing.assert_array_equal(arrays["a"], a)
    assert meta == {"note": "hi"}
    with pytest.raises(FormatError, match="not a cbir cbir-other file"):
        load_stamped_npz(path, "cbir-other", (1,))
    with pytest.raises(FormatError, match="version 2"):
        load_stamped_npz(path, "cbir-thing", (1,))
    path.write_bytes(b"garbage")
    with pytest.raises(FormatError, match="x.npz"):
        load_stamped_npz(path, "cbir-thing", (2,))
    with pytest.raises(FileNotFoundError):
        load_stamped_npz(tmp_path / "missing.npz", "cbir-thing", (2,))
    np.savez(tmp_path / "plain.npz", a=a)
    with pytest.raises(FormatError, match="no meta"):
        load_stamped_npz(tmp_path / "plain.npz", "cbir-thing", (2,))


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", block=1000) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_atomic_write_json_refuses_what_json_cannot_say(tmp_path, bad):
    """NaN/inf would make invalid JSON (strict readers refuse it): refused, nothing written, the old file kept."""
    import json

    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": [1.5, None]})
    with pytest.raises(ValueError, match=r"x.json: not written: .*NaN/inf are not JSON"):
        atomic_write_json(path, {"a": [1.5, bad]})
    assert json.loads(path.read_text()) == {"a": [1.5, None]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temporary left behind
