"""The user's own labelled photos: a folder per class, or a CSV of ``image,label``.

Every image is in the database; the queries are given as a list of image ids or paths, or sampled
(seeded) among images whose class has at least two images. For a query, the other images of its
class are positive; the query image itself is junk (taken out of its own ranking); the rest are
negative. Image ids are paths relative to the image root, without the extension (``class/name``).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..extraction.images import IMAGE_EXTENSIONS as IMAGE_EXTS
from ..fileio import FormatError
from .base import RetrievalDataset



def _image_id(rel: Path) -> str:
    return rel.with_suffix("").as_posix()


def _build(name: str, root: Path, rels: list[Path], labels: list[str], queries: Sequence[str] | None,
           n_queries: int | None, seed: int) -> RetrievalDataset:
    if not rels:
        raise ValueError(f"no images found for dataset {name!r} under {root}")
    ids = [_image_id(r) for r in rels]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"two images share the id {dup!r} (same name, different extension?)")
    row = {i: k for k, i in enumerate(ids)}
    lab = np.asarray(labels)
    if queries is not None:
        q_rows = []
        for q in queries:
            key = _image_id(Path(q)) if Path(q).suffix.lower() in IMAGE_EXTS else Path(q).as_posix()
            if key not in row:
                raise KeyError(f"query {q!r} is not one of the {len(ids)} images of {name}")
            q_rows.append(row[key])
    else:
        counts = Counter(labels)
        eligible = [k for k, l in enumerate(labels) if counts[l] >= 2]
        if not eligible:
            raise ValueError(f"{name}: no class has two images, so no query has a positive")
        n = min(n_queries or 10, len(eligible))
        rng = np.random.default_rng(seed)
        q_rows = sorted(rng.choice(eligible, size=n, replace=False).tolist())
    gnd = []
    for k in q_rows:
        same = np.flatnonzero(lab == lab[k])
        gnd.append({"ok": [int(i) for i in same if i != k], "junk": [int(k)]})
    paths = [root / r for r in rels]
    return RetrievalDataset(
        name=name,
        protocol="labels",
        db_ids=ids,
        db_paths=paths,
        query_ids=[ids[k] for k in q_rows],
        query_paths=[paths[k] for k in q_rows],
        query_bboxes=[None] * len(q_rows),
        gnd=gnd,
        info={"root": str(root), "labels": list(labels), "seed": seed if queries is None else None},
    )


def from_folder(root: str | Path, queries: Sequence[str] | None = None, n_queries: int | None = None,
                seed: int = 0) -> RetrievalDataset:
    """``root/<class>/<image>``: one sub-folder per class (sub-sub-folders belong to their class); the
    photos are those of :func:`cbir.collection.class_photos` (hidden files and non-images left out)."""
    from ..collection import class_photos

    root = Path(root)
    files, labels = class_photos(root)
    return _build(root.name, root, [f.relative_to(root) for f in files], labels, queries, n_queries, seed)


def from_csv(csv_path: str | Path, image_root: str | Path | None = None, queries: Sequence[str] | None = None,
             n_queries: int | None = None, seed: int = 0) -> RetrievalDataset:
    """A CSV with columns ``image,label`` (a header line naming them is optional); image paths are
    relative to ``image_root`` (default: the CSV's folder)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    root = Path(image_root) if image_root is not None else csv_path.parent
    rels, labels = [], []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for n, rec in enumerate(csv.reader(fh)):
            if not rec or not "".join(rec).strip():
                continue
            if len(rec) < 2:
                raise FormatError(f"{csv_path}:{n + 1}: expected 'image,label', got {rec!r}")
            if n == 0 and rec[0].strip().lower() in ("image", "path", "file") and rec[1].strip().lower() in ("label", "class"):
                continue
            rels.append(Path(rec[0].strip()))
            labels.append(rec[1].strip())
    return _build(csv_path.stem, root, rels, labels, queries, n_queries, seed)
