"""cbir.collection: the one rule for which files of a folder are photos (every command lists folders
through it), the ids of a descriptor store, and a folder of classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbir.collection import Photos, class_photos, collect_images, is_hidden, list_photos, walk_folder


def _tree(root: Path, names: list[str]) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_walk_folder_rule(tmp_path):
    _tree(tmp_path, ["a.jpg", "B.JPG", "c.Jpeg", "sub/d.png", "notes.txt", "sub/e.mov",
                     ".DS_Store", "._a.jpg", ".thumbnails/t.jpg", "sub/.git/x.png", "out/f.jpg"])
    photos, others = walk_folder(tmp_path, exclude=tmp_path / "out")
    rel = lambda ps: [p.relative_to(tmp_path).as_posix() for p in ps]  # noqa: E731
    assert rel(photos) == ["B.JPG", "a.jpg", "c.Jpeg", "sub/d.png"]  # sorted by path, any case of extension
    assert rel(others) == ["notes.txt", "sub/e.mov"]  # left out but listed, never lost silently
    photos, _ = walk_folder(tmp_path)
    assert "out/f.jpg" in rel(photos)  # only the excluded folder is skipped


def test_walk_folder_does_not_follow_folder_links_or_take_broken_links(tmp_path):
    _tree(tmp_path, ["real/a.jpg"])
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "top" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    assert walk_folder(tmp_path / "top") == ([], [])


def test_is_hidden():
    assert is_hidden(".DS_Store") and is_hidden("._IMG_1.jpg") and not is_hidden("a.jpg")


def test_list_photos_ids_and_named_files(tmp_path):
    _tree(tmp_path, ["p/a.jpg", "p/s/b.png", "p/readme.md", "loose.dat"])
    found = list_photos([tmp_path / "p", tmp_path / "loose.dat"])
    assert found.ids == ["a", "s/b", "loose"]  # a file named on the command line is taken whatever its name
    assert found.files[-1] == tmp_path / "loose.dat"
    assert found.not_images == [tmp_path / "p" / "readme.md"]
    line = found.skipped_line()
    assert line.startswith("skipped 1 file that is not an image") and "readme.md" in line
    assert Photos([], []).skipped_line() is None
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list_photos([tmp_path / "nope"])


def test_collect_images_refuses_twin_ids_and_empty_folders(tmp_path):
    _tree(tmp_path, ["a/x.jpg", "a/x.png", "b/notes.txt"])
    with pytest.raises(ValueError, match="same id 'x'"):
        collect_images([tmp_path / "a"])
    with pytest.raises(ValueError, match=r"no images found .*notes.txt"):
        collect_images([tmp_path / "b"])


def test_class_photos(tmp_path):
    _tree(tmp_path, ["cat/1.jpg", "cat/deep/2.jpg", "cat/.3.jpg", "dog/4.png", "dog/x.txt", ".trash/5.jpg",
                     "loose.jpg"])
    files, labels = class_photos(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["cat/1.jpg", "cat/deep/2.jpg", "dog/4.png"]
    assert labels == ["cat", "cat", "dog"]
    with pytest.raises(FileNotFoundError):
        class_photos(tmp_path / "nope")


def test_every_command_lists_a_folder_alike(tmp_path):
    """extract (collect_images), index build/add (index.build.list_images), datasets folder, training
    folder: the same photos from one folder of classes."""
    from cbir.datasets.folder import from_folder
    from cbir.index.build import list_images
    from cbir.training.data import load_class_folder

    _tree(tmp_path, ["c1/a.jpg", "c1/.b.jpg", "c1/n.txt", "c1/s/C.PNG", ".hid/d.jpg"])
    want = sorted([tmp_path / "c1" / "a.jpg", tmp_path / "c1" / "s" / "C.PNG"])
    assert collect_images([tmp_path]).files == want
    assert list_images([tmp_path]) == [p.resolve() for p in want]
    assert sorted(class_photos(tmp_path)[0]) == want
    ds = from_folder(tmp_path, n_queries=1)
    assert sorted(ds.db_paths) == want
    assert sorted(Path(p) for p in load_class_folder(tmp_path).paths) == want
