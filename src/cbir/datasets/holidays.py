"""INRIA Holidays (Jégou, Douze & Schmid, ECCV'08) with its official evaluation rule.

Images are named by a 6-digit id; ``group = id // 100``; the image whose id is ``group * 100``
(``NNNN00``) is the group's query and every other image of the group is one of its positives. Every
image (queries included) is in the database, and a query is left out of its own ranking: here it
is ``junk`` in the revisitop format, so the revisitop Medium/Easy mAP (positives = ``easy``, no
``hard``) is exactly the Holidays mAP of the official ``holidays_map.py`` (AP as the trapezoidal
area under the precision-recall curve, averaged over the queries). Queries without any positive
(incomplete subsets) are left out, as they have no AP.

Rotated photos: a few Holidays photos are stored sideways (no EXIF orientation). The literature
(Gordo et al. IJCV'17, Radenović et al. TPAMI'18: "holidaysmanrot") evaluates on a manually
rotated copy. ``rotations`` takes that correction as a list ``{image id: degrees counter-clockwise}``
(read from a ``rotations.txt`` beside the images: lines ``<id> <degrees>``); the rotated copies are
written once to ``jpg_rotated/`` (atomically, original files untouched) and used instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..extraction.images import IMAGE_EXTENSIONS as IMAGE_EXTS
from ..fileio import atomic_open
from .base import RetrievalDataset


def holidays_ground_truth(ids: Sequence[str]) -> tuple[list[int], list[dict[str, Any]]]:
    """Official rule on image ids (file stems, digits): ``(query rows, gnd)``.

    ``query rows``: indices into ``ids`` of the ``NNNN00`` images that have at least one other
    image in their group; ``gnd[i]``: ``{"easy": positives, "hard": [], "junk": [the query's own
    row], "bbx": None}`` (indices into ``ids``), in the order of ``query rows``.
    """
    groups: dict[int, list[int]] = {}
    for row, name in enumerate(ids):
        if not str(name).isdigit():
            raise ValueError(f"Holidays image names are numeric ids, got {name!r}")
        groups.setdefault(int(name) // 100, []).append(row)
    qrows, gnd = [], []
    for group in sorted(groups):
        rows = groups[group]
        query = [r for r in rows if int(ids[r]) == group * 100]
        if not query:
            continue
        q = query[0]
        positives = sorted(r for r in rows if r != q)
        if not positives:
            continue
        qrows.append(q)
        gnd.append({"easy": positives, "hard": [], "junk": [q], "bbx": None})
    return qrows, gnd


def read_rotations(path: str | os.PathLike[str]) -> dict[str, int]:
    """``<id> <degrees>`` per line (``#`` comments, commas allowed) -> {id: degrees in 90, 180, 270}."""
    out: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) % 90:
            raise ValueError(f"{path}: line {number}: expected '<image id> <degrees, a multiple of 90>', got {line!r}")
        out[Path(parts[0]).stem] = int(parts[1]) % 360
    return out


def _rotated_copies(paths: list[Path], ids: list[str], rotations: Mapping[str, int], folder: Path) -> list[Path]:
    """Paths with the listed images replaced by rotated copies in ``folder`` (written once, atomically)."""
    from PIL import Image, ImageOps

    out = []
    for path, name in zip(paths, ids):
        degrees = int(rotations.get(name, 0)) % 360
        if not degrees:
            out.append(path)
            continue
        dest = folder / f"{name}-rot{degrees}.jpg"
        if not dest.is_file():
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB").rotate(degrees, expand=True)
                with atomic_open(dest, "wb") as fh:
                    im.save(fh, format="JPEG", quality=95)
        out.append(dest)
    return out


def find_holidays_images(root: str | os.PathLike[str]) -> Path:
    """The Holidays image folder under ``root``: ``datasets/holidays/jpg``, ``holidays/jpg``, ``jpg``, or root."""
    root = Path(root)
    for cand in (root / "datasets" / "holidays" / "jpg", root / "holidays" / "jpg", root / "jpg", root):
        if cand.is_dir() and any(p.suffix.lower() in IMAGE_EXTS and p.stem.isdigit() for p in cand.iterdir()):
            return cand
    raise FileNotFoundError(f"no Holidays images (<id>.jpg) under {root}; run `cbir download holidays --data-root {root}`")


def load_holidays(root: str | os.PathLike[str], rotations: Mapping[str, int] | str | os.PathLike[str] | None = "auto",
                  name: str = "holidays") -> RetrievalDataset:
    """Holidays under ``root`` (every ``<id>.jpg``: the full 1491 images, or a subset) as a RetrievalDataset.

    ``rotations``: "auto" (``rotations.txt`` beside the image folder if there is one, else none),
    None (none), a file, or a mapping {id: degrees counter-clockwise}.
    """
    images = find_holidays_images(root)
    files = sorted((p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.stem.isdigit()),
                   key=lambda p: int(p.stem))
    ids = [p.stem for p in files]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{images}: two files share an image id")
    rot_file = None
    if rotations == "auto":
        cand = images.parent / "rotations.txt"
        rot_file, rotations = (cand, read_rotations(cand)) if cand.is_file() else (None, None)
    elif isinstance(rotations, (str, os.PathLike)):
        rot_file, rotations = Path(rotations), read_rotations(rotations)
    paths = list(files)
    if rotations:
        unknown = sorted(set(rotations) - set(ids))
        if unknown:
            raise ValueError(f"rotation given for image {unknown[0]!r}, which is not among the {len(ids)} images")
        paths = _rotated_copies(files, ids, rotations, images.parent / "jpg_rotated")
    qrows, gnd = holidays_ground_truth(ids)
    return RetrievalDataset(
        name=name, protocol="revisitop", db_ids=ids, db_paths=paths,
        query_ids=[ids[q] for q in qrows], query_paths=[paths[q] for q in qrows], query_bboxes=[None] * len(qrows),
        gnd=gnd, info={"images": str(images), "rule": "group = id // 100, NNNN00 the query",
                       "rotations": None if not rotations else {"file": str(rot_file) if rot_file else None,
                                                                "rotated": len([d for d in rotations.values() if d % 360])}},
    )
