"""cbir.fileio: atomic writes leave files with the permissions a plain write would give (issue 9.6)."""

from __future__ import annotations

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
