"""``RetrievalDataset``: image lists + ground truth + the protocol that scores a ranking of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import evaluation as ev

# protocol names understood by RetrievalDataset.evaluate
PROTOCOLS = ("revisitop", "original", "gldv2", "labels")


@dataclass
class RetrievalDataset:
    """A benchmark: database images, query images (optionally cropped) and their ground truth.

    ``gnd`` depends on ``protocol``:
      * ``"revisitop"``: per query ``{"easy", "hard", "junk", "bbx"}`` (indices into ``db_ids``);
      * ``"original"``: per query ``{"ok", "junk"}`` (good+ok positive, junk ignored);
      * ``"gldv2"`` / ``"labels"``: per query ``{"ok", "junk"}`` (relevant images; ``junk`` holds
        the query itself when it is also in the database).
    ``db_ids``/``query_ids`` are the image names the descriptors are looked up by.
    """

    name: str
    protocol: str
    db_ids: list[str]
    db_paths: list[Path]
    query_ids: list[str]
    query_paths: list[Path]
    query_bboxes: list[tuple[float, float, float, float] | None]
    gnd: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r} (known: {', '.join(PROTOCOLS)})")
        if len(self.db_ids) != len(self.db_paths):
            raise ValueError(f"{len(self.db_ids)} database ids for {len(self.db_paths)} paths")
        nq = len(self.query_ids)
        if not (len(self.query_paths) == len(self.query_bboxes) == len(self.gnd) == nq):
            raise ValueError(
                f"query lists disagree: {nq} ids, {len(self.query_paths)} paths, "
                f"{len(self.query_bboxes)} boxes, {len(self.gnd)} ground-truth entries"
            )

    def evaluate(self, scores: np.ndarray, kappas: Sequence[int] = ev.DEFAULT_KAPPAS, top_k: int | None = None) -> dict:
        """Score a (nq, ndb) score matrix (or integer ranking) with this dataset's protocol.

        revisitop: ``{"mAP": {easy, medium, hard}, "mP": {...}}``; original/labels:
        ``{"mAP": {"all": ..}, "mP": {"all": {...}}, "recall": {k: ..}}``; gldv2 adds
        ``"mAP@100"``. All in percent.
        """
        scores = np.asarray(scores)
        expect = (len(self.query_ids), len(self.db_ids))
        # more columns than database images = distractors appended after them (all negatives)
        if scores.shape[0] != expect[0] or (np.issubdtype(scores.dtype, np.floating) and scores.shape[1] < expect[1]):
            raise ValueError(f"scores have shape {scores.shape}, dataset {self.name} needs {expect}")
        if self.protocol == "revisitop":
            return ev.evaluate_revisitop(scores, self.gnd, kappas, top_k=top_k)
        ranks = ev.rank_from_scores(scores, top_k) if np.issubdtype(scores.dtype, np.floating) else scores
        res = ev.evaluate_original(ranks, self.gnd, kappas)
        out: dict[str, Any] = {
            "mAP": {"all": res["mAP"]},
            "mP": {"all": res["mP"]},
            "kappas": res["kappas"],
            "top_k": top_k,
        }
        # recall@k / mAP@100 on rankings with the query itself (junk) taken out
        clean = _drop_junk(ranks, self.gnd, width=100)
        relevant = [g["ok"] for g in self.gnd]
        out["recall"] = {k: 100.0 * v for k, v in ev.recall_at_k(clean, relevant, ks=tuple(kappas)).items()}
        if self.protocol == "gldv2":
            out["mAP@100"] = 100.0 * ev.map_at_k(clean, relevant, k=100)
        return out


def _drop_junk(ranks: np.ndarray, gnd: list[dict[str, Any]], width: int) -> np.ndarray:
    """The first ``width`` non-junk entries of each ranking (padded with -1 if fewer)."""
    out = np.full((ranks.shape[0], width), -1, dtype=np.int64)
    for i, g in enumerate(gnd):
        junk = np.asarray(g.get("junk", []), dtype=np.int64)
        row = ranks[i][~np.isin(ranks[i], junk)] if junk.size else ranks[i]
        row = row[:width]
        out[i, : row.size] = row
    return out
