"""A user's photo collection as inputs to describe: which files are photos, their ids, a BoW codebook.

**Which files are photos** (one rule for every command that lists a folder: ``cbir extract``,
``cbir index build`` / ``index add``, ``cbir evaluate`` / ``tune`` on a folder of classes, training on
a folder of classes): under a named folder, searched recursively,

- hidden entries are skipped: a file or folder whose name starts with ``.`` anywhere below the named
  folder (``.DS_Store``, macOS ``._IMG_1.jpg`` copies, ``.thumbnails/``, ``.git/``, an index's
  ``.writer.lock``); symbolic links to folders are not followed;
- a file is a photo when its name ends in one of :data:`cbir.extraction.images.IMAGE_EXTENSIONS`,
  in any case (``.JPG``, ``.Jpeg``); the other files are *not images*: they are left out and listed
  (``Photos.not_images``) so that the command says what it skipped, never losing one silently;
- the command's own output folder is skipped (``exclude``);
- a file named on the command line is always taken, whatever its name (asked for by the user; if it
  cannot be decoded it is reported as failed, with the reason).

Listings are sorted by path. **Id scheme** (used by ``cbir extract`` and looked up by ``cbir evaluate
--features``, ``cbir search --id`` and ``cbir index build --features``): a file found under a named
folder gets its path relative to that folder without the extension (``photos/a/b.jpg`` -> ``a/b``); a
file named directly gets its bare name (``b``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .extraction.images import IMAGE_EXTENSIONS, is_image_file

__all__ = ["Photos", "IMAGE_EXTENSIONS", "is_hidden", "walk_folder", "list_photos", "collect_images", "class_photos",
           "ensure_codebook", "image_id"]


def image_id(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """The id of ``path``: relative to ``root`` without extension, or the bare name without ``root``."""
    p = Path(path)
    if root is None:
        return p.stem
    return p.relative_to(root).with_suffix("").as_posix()


def is_hidden(name: str) -> bool:
    """True for a hidden file or folder name (it starts with ``.``)."""
    return name.startswith(".")


def walk_folder(folder: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None
                ) -> tuple[list[Path], list[Path]]:
    """(photos, not_images) under ``folder`` by the rule of the module docstring, each sorted by path.

    ``exclude``: a folder whose files are skipped (the command's output, when it lies inside)."""
    root = Path(folder)
    excl = Path(exclude).resolve() if exclude is not None else None
    photos: list[Path] = []
    others: list[Path] = []
    for here, dirs, files in os.walk(root):
        base = Path(here)
        dirs[:] = [d for d in dirs if not is_hidden(d) and (excl is None or (base / d).resolve() != excl)]
        for name in files:
            if is_hidden(name):
                continue
            f = base / name
            if not f.is_file():  # a broken link, a socket, ...
                continue
            (photos if is_image_file(name) else others).append(f)
    return sorted(photos), sorted(others)


@dataclass
class Photos:
    """The photos of some files and folders: ``files`` with their ``ids`` (same order), and the
    ``not_images`` left out of the folders (to be reported)."""

    files: list[Path]
    ids: list[str]
    not_images: list[Path] = field(default_factory=list)

    def skipped_line(self, shown: int = 3) -> str | None:
        """One line naming the files left out as not images, or None when there are none."""
        n = len(self.not_images)
        if not n:
            return None
        names = ", ".join(str(p) for p in self.not_images[:shown]) + (", ..." if n > shown else "")
        return (f"skipped {n} {'files that are not images' if n > 1 else 'file that is not an image'} "
                f"(by extension: {' '.join(IMAGE_EXTENSIONS)}): {names}")


def list_photos(paths: Sequence[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None) -> Photos:
    """The photos of ``paths`` (files named, and folders listed by :func:`walk_folder`) with their ids.

    FileNotFoundError for a missing input. Finding nothing is not an error here (the caller says so).
    """
    out = Photos([], [])
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            photos, others = walk_folder(p, exclude)
            out.files.extend(photos)
            out.ids.extend(image_id(f, p) for f in photos)
            out.not_images.extend(others)
        elif p.is_file():
            out.files.append(p)
            out.ids.append(image_id(p))
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return out


def collect_images(paths: Sequence[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None) -> Photos:
    """:func:`list_photos` for a descriptor store, whose rows are named by id: ValueError when two
    inputs get the same id (``a.jpg`` and ``a.png`` in one folder, naming both) or no photo is found."""
    found = list_photos(paths, exclude)
    seen: dict[str, Path] = {}
    for i, f in zip(found.ids, found.files):
        if i in seen:
            raise ValueError(f"two inputs get the same id {i!r}: {seen[i]} and {f} (rename one, or extract them separately)")
        seen[i] = f
    if not found.files:
        raise ValueError("no images found in " + ", ".join(map(str, paths))
                         + (f" ({found.skipped_line()})" if found.not_images else ""))
    return found


def class_photos(root: str | os.PathLike[str]) -> tuple[list[Path], list[str]]:
    """(files, class names) of a folder per class, ``ROOT/<class>/...``: each non-hidden sub-folder is a
    class holding the photos found under it by :func:`walk_folder` (files directly in ROOT belong to no
    class and are left out). FileNotFoundError when ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files: list[Path] = []
    labels: list[str] = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)):
        photos, _ = walk_folder(cls)
        files.extend(photos)
        labels.extend([cls.name] * len(photos))
    return files, labels


def ensure_codebook(model: Any, files: Sequence[Path], path: str | os.PathLike[str], *, imsize: int | None,
                    device: str = "auto") -> bool:
    """Give ``model``'s BoW pooling a codebook: read it from ``path`` when it exists, else fit it
    on up to 200 of ``files`` and save it there. Returns True when it was fitted now."""
    from .extract import fit_bow, load_codebook, save_codebook

    path = Path(path)
    if path.is_file():
        codebook, idf, _ = load_codebook(path)
        model.pooling.set_codebook(codebook, idf)
        return False
    fit = fit_bow(model, files, imsize=imsize, device=device)
    save_codebook(path, fit["codebook"], fit["idf"], {"model": model.describe()["model"], "images": fit["images"]})
    return True
