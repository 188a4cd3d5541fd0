"""A user's photo collection as inputs to describe: files, their ids, a BoW codebook if needed.

Id scheme (used by ``cbir extract`` and looked up by ``cbir evaluate --features``, ``cbir search
--id`` and ``cbir index build --features``): a file found under a named folder gets its path
relative to that folder without the extension (``photos/a/b.jpg`` -> ``a/b``); a file named
directly gets its bare name (``b``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["collect_images", "ensure_codebook", "image_id"]


def image_id(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """The id of ``path``: relative to ``root`` without extension, or the bare name without ``root``."""
    p = Path(path)
    if root is None:
        return p.stem
    return p.relative_to(root).with_suffix("").as_posix()


def collect_images(paths: Sequence[str | os.PathLike[str]], exclude: Path | None = None) -> tuple[list[str], list[Path]]:
    """(ids, files): files named, or every non-hidden file under named folders (sorted).

    Non-image files under a folder are kept, so that they are reported as failed, not silently
    lost. Files under ``exclude`` (the output folder) are skipped. FileNotFoundError for a missing
    input; ValueError when two inputs get the same id or nothing is found.
    """
    ids: list[str] = []
    files: list[Path] = []
    excl = exclude.resolve() if exclude is not None else None
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if not f.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                if excl is not None and (excl == f.resolve().parent or excl in f.resolve().parents):
                    continue
                ids.append(image_id(f, p))
                files.append(f)
        elif p.is_file():
            ids.append(image_id(p))
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    seen: dict[str, Path] = {}
    for i, f in zip(ids, files):
        if i in seen:
            raise ValueError(f"two inputs get the same id {i!r}: {seen[i]} and {f} (rename one, or extract them separately)")
        seen[i] = f
    if not files:
        raise ValueError("no files found in " + ", ".join(map(str, paths)))
    return ids, files


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
