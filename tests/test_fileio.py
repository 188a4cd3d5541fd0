"""cbir.fileio: the stamped .npz and the file digest every stage shares."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cbir.fileio import FormatError, load_stamped_npz, save_stamped_npz, sha256_file


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
