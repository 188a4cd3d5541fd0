"""Original Oxford5k / Paris6k ground truth (Philbin et al., CVPR'07 / CVPR'08).

A folder of ``<landmark>_<n>_{query,good,ok,junk}.txt`` files, 55 queries. ``*_query.txt`` holds one
line ``<image> x1 y1 x2 y2`` (Oxford writes the image as ``oxc1_<name>``); the other files list image
names (Paris with a ``.jpg`` suffix; Oxford's lists contain a few duplicates). Protocol: good + ok
are positive, junk is ignored (taken out of the ranking), every other image is negative; the query
is cropped to its box. Duplicates count once, as in the original ``compute_ap.cpp`` (sets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..fileio import FormatError
from .base import RetrievalDataset


def _clean(name: str) -> str:
    name = name.strip()
    if name.startswith("oxc1_"):
        name = name[len("oxc1_"):]
    if name.lower().endswith(".jpg"):
        name = name[:-4]
    return name


def _read_list(path: Path) -> list[str]:
    seen: dict[str, None] = {}
    for line in path.read_text().split("\n"):
        if line.strip():
            seen.setdefault(_clean(line.split()[0]), None)
    return list(seen)


def read_original_gt(gt_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per query, sorted by query name: ``query`` (e.g. all_souls_1), ``image``,
    ``bbox`` (x1, y1, x2, y2), ``good``, ``ok``, ``junk`` (image names, deduplicated)."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder not found: {gt_dir}")
    queries = sorted(gt_dir.glob("*_query.txt"))
    if not queries:
        raise FormatError(f"{gt_dir} holds no *_query.txt files (expected the original Oxford/Paris ground truth)")
    out = []
    for qf in queries:
        stem = qf.name[: -len("_query.txt")]
        fields = qf.read_text().split()
        if len(fields) != 5:
            raise FormatError(f"{qf}: expected '<image> x1 y1 x2 y2', got {' '.join(fields)!r}")
        entry: dict[str, Any] = {
            "query": stem,
            "image": _clean(fields[0]),
            "bbox": tuple(float(v) for v in fields[1:]),
        }
        for kind in ("good", "ok", "junk"):
            f = gt_dir / f"{stem}_{kind}.txt"
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing (every query needs good, ok and junk lists)")
            entry[kind] = _read_list(f)
        out.append(entry)
    return out


def from_original_gt(
    gt_dir: str | Path,
    db_names: Sequence[str],
    images: str | Path | None = None,
    name: str = "original",
    ext: str = ".jpg",
) -> RetrievalDataset:
    """The original protocol over the database ``db_names`` (e.g. every image of the jpg folder).

    Positives/junk not among ``db_names`` are left out (and counted in ``info["missing"]``): the
    original Paris6k has 20 corrupted images that are usually removed from the database.
    """
    queries = read_original_gt(gt_dir)
    db_names = list(db_names)
    row = {n: i for i, n in enumerate(db_names)}
    img_dir = Path(images) if images is not None else Path(".")
    gnd, missing = [], 0
    for q in queries:
        pos = [n for n in dict.fromkeys(q["good"] + q["ok"])]
        missing += sum(n not in row for n in pos)
        gnd.append({
            "ok": [row[n] for n in pos if n in row],
            "junk": [row[n] for n in q["junk"] if n in row],
        })
    return RetrievalDataset(
        name=name,
        protocol="original",
        db_ids=db_names,
        db_paths=[img_dir / f"{n}{ext}" for n in db_names],
        query_ids=[q["image"] for q in queries],
        query_paths=[img_dir / f"{q['image']}{ext}" for q in queries],
        query_bboxes=[q["bbox"] for q in queries],
        gnd=gnd,
        info={"gt_dir": str(gt_dir), "images": str(img_dir), "queries": [q["query"] for q in queries], "missing": missing},
    )


def load_original(name: str, root: str | Path) -> RetrievalDataset:
    """``oxford5k`` / ``paris6k``: images in ``BASE/jpg``, ground truth in ``BASE/gt``, where BASE is
    ``root/datasets/NAME`` (the `cbir download` layout), ``root/NAME`` or ``root``; the database
    is every .jpg of the folder."""
    root = Path(root)
    base = next((b for b in (root / "datasets" / name, root / name) if b.is_dir()), root)
    img_dir, gt_dir = base / "jpg", base / "gt"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {img_dir}; run `cbir download {name} --data-root {root}`")
    names = sorted(p.stem for p in img_dir.glob("*.jpg"))
    return from_original_gt(gt_dir, names, images=img_dir, name=name)
