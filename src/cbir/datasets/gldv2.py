"""Google Landmarks v2 retrieval (Weyand et al., CVPR'20): index/test CSVs and the solution file.

``index.csv`` / ``test.csv``: a header with an ``id`` column (16 hex digits); images stored as
``<root>/<split>/<a>/<b>/<c>/<id>.jpg`` (a, b, c = the first three characters of the id).
``retrieval_solution_v2.1.csv``: ``id,images,Usage``; ``images`` lists the relevant index ids
(space separated); ``Usage`` is Public, Private or Ignored. Ignored queries (no relevant images)
are left out, as in the Kaggle metric.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, Sequence

from ..fileio import FormatError
from .base import RetrievalDataset

SOLUTION = "retrieval_solution_v2.1.csv"


def _ids(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise FileNotFoundError(f"GLDv2 file not found: {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "id" not in reader.fieldnames:
            raise FormatError(f"{path}: expected a CSV with an 'id' column")
        for rec in reader:
            yield rec["id"]


def image_path(root: Path, split: str, image_id: str) -> Path:
    return root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def load_gldv2(root: str | Path, usage: Sequence[str] = ("Public", "Private")) -> RetrievalDataset:
    """GLDv2 retrieval under ``root`` (``index.csv``, ``test.csv``, the solution file, ``index/``
    and ``test/`` image trees). ``usage``: which solution rows are queries."""
    root = Path(root)
    index_ids = list(_ids(root / "index.csv"))
    test_ids = set(_ids(root / "test.csv"))
    row = {n: i for i, n in enumerate(index_ids)}
    sol = root / SOLUTION
    if not sol.is_file():
        raise FileNotFoundError(f"GLDv2 solution file not found: {sol}")
    q_ids, gnd, missing = [], [], 0
    with open(sol, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"id", "images", "Usage"} <= set(reader.fieldnames):
            raise FormatError(f"{sol}: expected columns id,images,Usage")
        for rec in reader:
            if rec["Usage"] not in usage:
                continue
            if rec["id"] not in test_ids:
                raise FormatError(f"{sol}: query {rec['id']} is not in test.csv")
            rel = [r for r in rec["images"].split() if r and r != "None"]
            missing += sum(r not in row for r in rel)
            q_ids.append(rec["id"])
            gnd.append({"ok": [row[r] for r in rel if r in row], "junk": []})
    return RetrievalDataset(
        name="gldv2",
        protocol="gldv2",
        db_ids=index_ids,
        db_paths=[image_path(root, "index", i) for i in index_ids],
        query_ids=q_ids,
        query_paths=[image_path(root, "test", i) for i in q_ids],
        query_bboxes=[None] * len(q_ids),
        gnd=gnd,
        info={"root": str(root), "usage": list(usage), "missing": missing},
    )
