"""Same bytes, same photo: `cbir index add` and the service's POST /images share one rule
(cbir.index.duplicates.indexed_copies): a byte-identical copy at another path is not a new id."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cbir.cli import main
from cbir.index import Index
from cbir.index.build import plan_add
from cbir.index.duplicates import content_of, indexed_copies


def _index(tmp_path: Path, n: int = 3) -> tuple[Index, list[Path]]:
    files = []
    for k in range(n):
        f = tmp_path / "photos" / f"p{k}.jpg"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(bytes([k]) * (100 + k))  # distinct content, distinct sizes
        files.append(f.resolve())
    vecs = np.eye(n, 4, dtype=np.float32)
    idx = Index(4, "exact", device="cpu", settings={"model": "none"})
    idx.add(vecs, [str(f) for f in files])
    return idx, files


def test_indexed_copies_finds_the_id_by_content(tmp_path):
    idx, files = _index(tmp_path)
    sha1, size1 = content_of(files[1])
    assert content_of(tmp_path / "missing.jpg") is None
    other = "0" * 64
    assert indexed_copies(idx, {sha1: size1, other: size1}) == {sha1: 1}
    # a wrong size rules a file out before hashing: same sha but claimed another size finds nothing
    assert indexed_copies(idx, {sha1: size1 + 1}) == {}
    # a known path is tried first (the service's upload store)
    assert indexed_copies(idx, {sha1: 7}, known=lambda sha: files[1]) == {sha1: 1}
    files[1].unlink()  # an indexed file that is gone matches nothing
    assert indexed_copies(idx, {sha1: size1}) == {}


def test_plan_add_copies_repeats_and_update(tmp_path):
    idx, files = _index(tmp_path)
    copy = tmp_path / "elsewhere" / "renamed.jpg"
    copy.parent.mkdir()
    shutil.copy(files[2], copy)
    new = tmp_path / "elsewhere" / "new.jpg"
    new.write_bytes(b"new photo bytes")
    twin = tmp_path / "elsewhere" / "twin.jpg"
    shutil.copy(new, twin)
    plan = plan_add(idx, [files[0], copy, new, twin, new])
    assert plan.already == {files[0]: 0}
    assert plan.copies == {copy.resolve(): 2}
    assert plan.todo == [new.resolve()]
    assert plan.repeats == {twin.resolve(): new.resolve(), new.resolve(): new.resolve()}
    plan = plan_add(idx, [files[0]], update=True)  # re-describing an indexed path is not a copy of itself
    assert plan.todo == [files[0]] and not plan.copies


def test_cli_index_add_reports_a_copy_as_a_duplicate_of_its_id(tmp_path, capsys):
    idx, files = _index(tmp_path)
    idx.save(tmp_path / "ix")
    copy = tmp_path / "copy.jpg"
    shutil.copy(files[1], copy)
    assert main(["index", "add", str(tmp_path / "ix"), str(copy), "--no-cache"]) == 0
    out, err = capsys.readouterr()
    assert f"duplicate of id 1 (same bytes as {files[1]}): {copy.resolve()}" in err
    assert "nothing to add (0 already indexed, 1 duplicates)" in out
    assert len(Index.load(tmp_path / "ix", device="cpu")) == 3
    # a folder: its photos by the rule of cbir.collection, the rest reported in one line
    (tmp_path / "more").mkdir()
    shutil.copy(files[0], tmp_path / "more" / "a.jpg")
    (tmp_path / "more" / "notes.txt").write_text("x")
    (tmp_path / "more" / ".hidden.jpg").write_bytes(b"x")
    assert main(["index", "add", str(tmp_path / "ix"), str(tmp_path / "more"), "--no-cache"]) == 0
    out, err = capsys.readouterr()
    assert "skipped 1 file that is not an image" in err and "notes.txt" in err and ".hidden" not in err
    assert "duplicate of id 0" in err and "nothing to add (0 already indexed, 1 duplicates)" in out


def test_service_knows_a_photo_added_from_the_command_line(demo_index, demo, demo_gnd):
    """An upload holding the bytes of a photo indexed at its own path (not through the service) is
    that photo: same id, nothing stored, nothing added."""
    fastapi_testclient = pytest.importorskip("fastapi.testclient")
    from cbir.server import create_app

    idx, path, encoder = demo_index
    client = fastapi_testclient.TestClient(create_app(idx, index_path=path, encoder=encoder, device="cpu"),
                                           base_url="http://127.0.0.1")
    name = demo_gnd["imlist"][4]
    data = (demo / "jpg" / f"{name}.jpg").read_bytes()
    r = client.post("/api/images", files={"file": ("other-name.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": 4, "added": False, "detail": "this image is already in the index"}
    assert len(Index.load(path, device="cpu")) == 33
    assert not (path / "uploads").exists() or not any((path / "uploads").iterdir())
