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
    verifier: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_settings: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Re-rank (whitening, DBA, QE, diffusion, spatial verification as ``rerank`` says; default:
    cosine) and score with the benchmark's protocol.

    ``rerank``: a :class:`Rerank` or a :class:`cbir.rerank.recipe.Recipe`. With ``verify`` set, the
    inlier counts come from ``verifier``, or else from the benchmark's local features
    (:func:`cbir.pipeline.verifying.benchmark_verifier`: extracted once into the local-feature cache
    under ``cache_dir`` with ``local_settings``, queries cropped as ``q`` was, i.e. unless its meta
    says ``cropped_queries: false``; matching on ``device``); the result then holds
    ``"verification"`` (what was extracted, pairs verified, seconds per query).

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
    verify = getattr(rerank, "verify", None)
    if (distractors is not None and top_k is not None and not keep_scores and verify is None
            and isinstance(rerank, Rerank) and (rerank.is_off() or _whiten_only(rerank))):
        ranks, n_dis, applied = _topk_with_distractors(qm, dbm, distractors, int(top_k), rerank, device)
        res = dict(bench.evaluate(ranks, top_k=top_k))
        res.update(applied=applied, n_distractors=n_dis)
        return res
    if distractors is not None:
        before = dbm.shape[0]
        dbm = with_distractors(dbm, distractors)
        n_dis = dbm.shape[0] - before
    if verify is not None and verifier is None:
        from .verifying import benchmark_verifier

        crop = not (isinstance(q, Descriptors) and q.meta.get("cropped_queries") is False)
        verifier = benchmark_verifier(bench, settings=local_settings, cache_dir=cache_dir, crop=crop,
                                      progress=progress, device=device, keep=keep_scores)
    import time

    t0 = time.perf_counter()
    scores, applied = rerank.apply(qm, dbm, verifier) if verify is not None else rerank.apply(qm, dbm)
    seconds = time.perf_counter() - t0
    res = dict(bench.evaluate(scores, top_k=top_k))
    res["applied"] = applied
    res["n_distractors"] = n_dis
    if verify is not None:
        res["verification"] = verification_record(verifier, len(bench.query_ids), seconds)
        if keep_scores:
            res["verifier"] = verifier
    if keep_scores:
        res["scores"] = scores
    return res


def verification_record(verifier: Any, n_queries: int, seconds: float) -> dict[str, Any]:
    """What spatial verification cost: the verifier's counters, the re-ranking's seconds per query,
    and (for a benchmark's verifier) what local features were extracted / read from the cache."""
    stats = dict(verifier.stats()) if hasattr(verifier, "stats") else {}
    rec: dict[str, Any] = {**stats, "rerank_seconds_per_query": round(seconds / max(n_queries, 1), 4)}
    if stats.get("pairs"):
        rec["ms_per_pair"] = round(1000 * stats["seconds"] / stats["pairs"], 3)
    if n_queries:
        rec["verify_seconds_per_query"] = round(stats.get("seconds", 0.0) / n_queries, 4)
    ext = getattr(verifier, "extraction", None)
    if ext is not None:
        rec["local_features"] = {"settings": ext.store.settings.key(), "extracted": ext.extracted,
                                 "from_cache": ext.from_cache, "unreadable": len(ext.failed),
                                 "seconds": round(ext.seconds, 2)}
    return rec


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
    verifier: Any = None,
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
    res = score(bench, q, db, rerank, top_k=top_k, distractors=distractors, keep_scores=keep_scores,
                verifier=verifier, cache_dir=describe_kw.get("cache_dir"))
    res.update(dataset=bench.name, protocol=bench.protocol, n_db=len(bench.db_ids), n_queries=len(bench.query_ids),
               settings={k: v for k, v in db.meta.items() if k != "part"})
    return res
