"""Descriptors -> figures: re-ranking from one Rerank object, distractors, the benchmark's protocol."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..datasets import RetrievalDataset
from ..descriptors import Descriptors
from ..rerank.compose import Rerank
from .benchmark import Benchmark, load_benchmark
from .describing import describe, lookup, with_distractors


def _whiten_only(rerank: Rerank) -> bool:
    return bool(rerank.whiten) and Rerank(whiten=rerank.whiten) == rerank


def _topk_with_distractors(q: np.ndarray, db: np.ndarray, distractors: Any, k: int, rerank: Rerank,
                           device: str = "cpu") -> tuple[np.ndarray, int, dict[str, Any]]:
    """Top-k rows (nq, k) over the database followed by the memory-mapped distractors, read block by
    block (:func:`cbir.topk.chunked_topk`, "cpu" float32 / "cuda" float16); rows >= len(db) are
    distractors. Each block is L2-normalised, or whitened when ``rerank`` holds only a whitening.
    Returns (ranks, n_distractors, applied)."""
    from pathlib import Path

    from ..linalg import l2_normalize
    from ..rerank.compose import whitening_record
    from ..topk import chunked_topk, iter_blocks

    dis = distractors if isinstance(distractors, Descriptors) else Descriptors.load(distractors, mmap=True)
    if dis.dim != db.shape[1]:
        raise ValueError(f"distractor descriptors are {dis.dim}-D, the database {db.shape[1]}-D")
    applied: dict[str, Any] = {}
    transform = l2_normalize
    if rerank.whiten:
        from ..whitening import Whitening

        w = Whitening.load(rerank.whiten)
        transform = w.apply
        applied["whiten"] = whitening_record(w, str(Path(rerank.whiten)))
    n_db = db.shape[0]

    def blocks():
        yield 0, db
        for start, block in iter_blocks(dis.vectors if isinstance(dis.vectors, np.ndarray) else dis):
            yield n_db + start, block

    _, rows = chunked_topk(transform(q), blocks(), k, device=device, transform=transform)
    return rows, len(dis), applied


def _matrix(x: Descriptors | np.ndarray) -> np.ndarray:
    return np.asarray(x.vectors if isinstance(x, Descriptors) else x, dtype=np.float32)


def score(
    bench: Benchmark,
    q: Descriptors | np.ndarray,
    db: Descriptors | np.ndarray,
    rerank: Rerank | None = None,
    *,
    top_k: int | None = None,
    distractors: str | os.PathLike[str] | Descriptors | None = None,
    keep_scores: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Re-rank (whitening, DBA, QE, diffusion as ``rerank`` says; default: cosine) and score with
    the benchmark's protocol.

    Returns ``{"mAP": {easy, medium, hard} (or {"all"}), "mP": {...: {k: ..}}, "kappas", "applied",
    "n_distractors"}`` in percent (+ ``"scores"`` (nq, n) when ``keep_scores``). ``top_k`` ranks only
    the top K per query (large databases). With ``distractors`` and ``top_k`` and no re-ranking
    beyond whitening, the database and the (memory-mapped) distractors are scanned in blocks by
    :func:`cbir.topk.chunked_topk` on ``device`` (bounded memory at +1M, the in-memory ranking);
    otherwise (DBA, QE, diffusion need every score) they are stacked in memory.
    """
    rerank = rerank or Rerank()
    qm, dbm = _matrix(q), _matrix(db)
    n_dis = 0
    if (distractors is not None and top_k is not None and not keep_scores
            and (rerank.is_off() or _whiten_only(rerank))):
        ranks, n_dis, applied = _topk_with_distractors(qm, dbm, distractors, int(top_k), rerank, device)
        res = dict(bench.evaluate(ranks, top_k=top_k))
        res.update(applied=applied, n_distractors=n_dis)
        return res
    if distractors is not None:
        before = dbm.shape[0]
        dbm = with_distractors(dbm, distractors)
        n_dis = dbm.shape[0] - before
    scores, applied = rerank.apply(qm, dbm)
    res = dict(bench.evaluate(scores, top_k=top_k))
    res["applied"] = applied
    res["n_distractors"] = n_dis
    if keep_scores:
        res["scores"] = scores
    return res


def evaluate(
    bench: Benchmark | str | os.PathLike[str],
    model: Any = None,
    *,
    features: str | os.PathLike[str] | None = None,
    query_features: str | os.PathLike[str] | None = None,
    rerank: Rerank | None = None,
    top_k: int | None = None,
    distractors: str | os.PathLike[str] | None = None,
    keep_scores: bool = False,
    **describe_kw: Any,
) -> dict[str, Any]:
    """The whole chain: benchmark -> descriptors (``model`` through :func:`describe`, or saved
    ``features`` through :func:`lookup`) -> :func:`score`. The result also holds ``settings``
    (what made the descriptors) and ``dataset``/``protocol``/``n_db``/``n_queries``."""
    if not isinstance(bench, RetrievalDataset):
        bench = load_benchmark(bench)
    if (model is None) == (features is None):
        raise ValueError("give a model (to describe the images) or saved features, not both")
    if features is not None:
        q, db = lookup(bench, features, query_features)
    else:
        q, db = describe(bench, model, **describe_kw)
    res = score(bench, q, db, rerank, top_k=top_k, distractors=distractors, keep_scores=keep_scores)
    res.update(dataset=bench.name, protocol=bench.protocol, n_db=len(bench.db_ids), n_queries=len(bench.query_ids),
               settings={k: v for k, v in db.meta.items() if k != "part"})
    return res
