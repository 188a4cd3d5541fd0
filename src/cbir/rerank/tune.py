"""Choose whitening and re-ranking on labelled validation sets: the search behind ``cbir tune``.

Only the validation sets are given to :func:`tune`; nothing of a test set is. The search, in
order (coordinate ascent, each step keeps the best of the previous one):

1. whitening: none; PCA learned on the database at use time (a rule: power x shrinkage x dim);
   PCA learned on the validation databases' vectors; Lw learned on the validation sets' matching
   pairs (every pair within {query} + its positives). Learned whitenings that use labels (Lw) are
   scored by 2-fold cross-validation over each set's queries, split by group (queries that share
   a positive stay together): learned on the pairs of one fold, scored on the queries of the
   other, so that a whitening is never scored on the pairs (nor the landmarks) it was learned from;
2. alpha-QE k x DBA k (alpha 3 both);
3. diffusion off, or graph k (database-size rule, 10, 50) x kq x alpha x sim_weight;
4. spatial verification (when every set has a *verifier*, :class:`LabelledSet`): off, or the top
   K in {50, 100} verified, with the rules: verified first, verified query expansion, or both
   (:class:`cbir.rerank.verify.VerifyParams`, the chain of :mod:`cbir.rerank.compose`). Each
   (query, image) pair is verified once by the verifier whatever the candidates ask.

Objective: the mean over validation sets of the set's score, itself the mean of Medium and Hard
mAP for a revisitop ground truth (Medium alone when no query has hard positives, as Holidays),
or the mAP of a folder-per-class set. A candidate must beat the incumbent by ``min_gain`` points
to replace it, so that ties go to the simpler setting (no whitening, smaller k, no diffusion).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from ..datasets.base import RetrievalDataset
from ..linalg import l2_normalize
from ..whitening import Whitening, learn_lw, learn_pca_whitening
from .diffusion import DiffusionParams, diffusion_scores, knn_graph
from .compose import ALPHA, Rerank, order_verified, verify_top
from .qe import alpha_qe, dba
from .recipe import Recipe, WhiteningSpec, fit_database_whitening
from .verify import VerifyParams, expand_queries


@dataclass
class LabelledSet:
    """A validation set: query (nq, D) and database (n, D) descriptors and its ground truth;
    ``verifier`` (query row, database rows) -> inlier counts, for the verification step (None:
    that step is skipped; :func:`cbir.pipeline.verifying.benchmark_verifier` makes one)."""

    name: str
    q: np.ndarray
    db: np.ndarray
    dataset: RetrievalDataset
    verifier: Any = None

    def __post_init__(self) -> None:
        if self.q.shape[0] != len(self.dataset.query_ids) or self.db.shape[0] != len(self.dataset.db_ids):
            raise ValueError(f"{self.name}: descriptors {self.q.shape}/{self.db.shape} do not match the "
                             f"{len(self.dataset.query_ids)} queries / {len(self.dataset.db_ids)} database images")


@dataclass(frozen=True)
class Grid:
    """The candidates tried (defaults: the search of the module docstring)."""

    pca_power: Sequence[float] = (0.5, 1.0)
    shrinkage: Sequence[float] = (0.1, 0.5)
    dims: Sequence[int | None] = (None, 512, 256)
    lw: bool = True
    qe: Sequence[int] = (0, 1, 2, 3, 5, 10)
    dba: Sequence[int] = (0, 2, 3, 5, 10)
    diffusion_k: Sequence[int | None] = (None, 10, 50)
    diffusion_kq: Sequence[int] = (3, 5, 10)
    diffusion_alpha: Sequence[float] = (0.8, 0.9, 0.99)
    diffusion_sim_weight: Sequence[float] = (0.0, 0.5, 2.0)
    verify: Sequence[VerifyParams] = tuple(
        VerifyParams(k=k, order=order, expand=expand)
        for k in (50, 100) for order, expand in (("first", False), ("none", True), ("first", True)))
    min_gain: float = 0.1
    folds: int = 2


# ----------------------------------------------------------------------------- scoring


def score_of(dataset: RetrievalDataset, scores: np.ndarray) -> float:
    """The set's objective in percent: revisitop (Medium + Hard) / 2 (Medium when Hard is NaN),
    else the protocol's mAP."""
    res = dataset.evaluate(scores)
    m = res["mAP"]
    if dataset.protocol == "revisitop":
        vals = [v for v in (m["medium"], m["hard"]) if not np.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")
    return float(m["all"])


def subset(dataset: RetrievalDataset, rows: np.ndarray) -> RetrievalDataset:
    """The same benchmark restricted to the queries ``rows``."""
    rows = [int(r) for r in rows]
    return replace(dataset, query_ids=[dataset.query_ids[r] for r in rows],
                   query_paths=[dataset.query_paths[r] for r in rows],
                   query_bboxes=[dataset.query_bboxes[r] for r in rows], gnd=[dataset.gnd[r] for r in rows])


def positives(dataset: RetrievalDataset, i: int) -> list[int]:
    """Database rows relevant to query i (revisitop: easy + hard; other protocols: ok)."""
    g = dataset.gnd[i]
    keys = ("easy", "hard") if dataset.protocol == "revisitop" else ("ok",)
    return sorted({int(j) for key in keys for j in g.get(key, [])})


def matching_pairs(sets: Sequence[LabelledSet], rows: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Vectors X (stacked db + queries of every set) and pairs (M, 2) of rows of X that match:
    every pair within {query} + its positives, for the queries ``rows[s]`` of set s (all if None)."""
    blocks, pairs, offset = [], set(), 0
    for s, vs in enumerate(sets):
        n = vs.db.shape[0]
        blocks += [vs.db, vs.q]
        use = range(len(vs.q)) if rows is None else rows[s]
        for i in use:
            group = [offset + n + int(i)] + [offset + j for j in positives(vs.dataset, int(i))]
            pairs.update((a, b) if a < b else (b, a) for a, b in itertools.combinations(group, 2))
        offset += n + vs.q.shape[0]
    x = np.concatenate(blocks).astype(np.float32)
    return x, np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


@dataclass
class _View:
    """Queries of one set scored against its database, both already whitened."""

    set_index: int
    q: np.ndarray
    db: np.ndarray
    dataset: RetrievalDataset
    graphs: dict = field(default_factory=dict)
    qrows: np.ndarray | None = None  # the set's query rows of these queries (None: all, in order)


def _mean_over_sets(views: Sequence[_View], values: Sequence[float], n_sets: int) -> float:
    """Query-weighted mean within a set, then the plain mean over sets."""
    per_set = []
    for s in range(n_sets):
        pairs = [(v.dataset.gnd, val) for v, val in zip(views, values) if v.set_index == s]
        w = np.array([len(g) for g, _ in pairs], dtype=np.float64)
        per_set.append(float(np.dot(w, [val for _, val in pairs]) / w.sum()))
    return float(np.mean(per_set))


# ----------------------------------------------------------------------------- whitening step


def _whitening_candidates(grid: Grid) -> list[WhiteningSpec]:
    out = [WhiteningSpec("none")]
    for fit in ("database", "validation"):
        for p, s, d in itertools.product(grid.pca_power, grid.shrinkage, grid.dims):
            out.append(WhiteningSpec("pca", fit, power=p, shrinkage=s, dim=d))
    if grid.lw:
        for s, d in itertools.product(grid.shrinkage, grid.dims):
            out.append(WhiteningSpec("lw", "validation", shrinkage=s, dim=d))
    return out


def _learn(spec: WhiteningSpec, sets: Sequence[LabelledSet], rows: Sequence[np.ndarray] | None) -> Whitening:
    """A validation-fit whitening: PCA on all validation database vectors, or Lw on the pairs of
    the queries ``rows`` (all when None)."""
    dim = None if spec.dim is None else min(int(spec.dim), sets[0].db.shape[1])
    if spec.method == "pca":
        x = np.concatenate([s.db for s in sets]).astype(np.float32)
        return learn_pca_whitening(x, power=spec.power, dim=dim, shrinkage=spec.shrinkage)
    x, pairs = matching_pairs(sets, rows)
    if len(pairs) == 0:
        raise ValueError("no matching pairs in the validation sets: Lw cannot be learned")
    return learn_lw(x, pairs, dim=dim, shrinkage=spec.shrinkage)


def _top(w: Whitening, dim: int | None) -> Whitening:
    """The first ``dim`` output dimensions of w. PCA and Lw order their outputs by decreasing
    eigenvalue, so this equals learning with ``dim`` (one eigen-decomposition for every dim)."""
    if dim is None or dim >= w.out_dim:
        return w
    return Whitening(mean=w.mean, proj=w.proj[:dim], meta={**w.meta, "dim": int(dim)})


def query_groups(dataset: RetrievalDataset) -> np.ndarray:
    """Component of each query: queries that share a positive (the same landmark or object)
    are in one component (union-find over the positive lists) -> (nq,) int labels."""
    nq = len(dataset.query_ids)
    parent = list(range(nq))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    owner: dict[int, int] = {}
    for i in range(nq):
        for j in positives(dataset, i):
            if j in owner:
                parent[find(i)] = find(owner[j])
            else:
                owner[j] = i
    roots = [find(i) for i in range(nq)]
    _, labels = np.unique(roots, return_inverse=True)
    return labels.astype(np.int64)


def _folds(dataset: RetrievalDataset, k: int) -> list[np.ndarray]:
    """k folds of the queries that never split a component of :func:`query_groups` (so no fold's
    positives are another fold's pairs); components dealt round-robin. Fewer than k components:
    fewer folds (one fold = the set cannot score a label-learned whitening)."""
    groups = query_groups(dataset)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    k = min(k, n_groups)
    return [np.flatnonzero(groups % k == f) for f in range(k)] if k else []


def _views(spec: WhiteningSpec, sets: Sequence[LabelledSet], grid: Grid, memo: dict) -> list[_View]:
    """The views scoring ``spec`` (cross-validated over queries when it is learned from labels).

    ``memo`` keeps the all-dimension whitenings, keyed by everything but the dimension."""
    full = spec.model_copy(update={"dim": None})

    def learned(key, fn):
        if key not in memo:
            memo[key] = fn()
        return _top(memo[key], spec.dim)

    views = []
    if spec.method == "lw":
        folds = [_folds(s.dataset, grid.folds) for s in sets]
        if any(len(fo) < 2 for fo in folds):
            bad = [s.name for s, fo in zip(sets, folds) if len(fo) < 2]
            raise ValueError(f"Lw cannot be cross-validated on {bad}: fewer than 2 separate groups of queries")
        for f in range(grid.folds):
            train = [np.concatenate([fo[g] for g in range(len(fo)) if g != f]) for fo in folds]
            w = learned((full, "fold", f), lambda: _learn(full, sets, train))
            for si, s in enumerate(sets):
                if f < len(folds[si]):
                    test = folds[si][f]
                    views.append(_View(si, w.apply(s.q[test]), w.apply(s.db), subset(s.dataset, test), qrows=test))
        return views
    for si, s in enumerate(sets):
        if spec.method == "none":
            views.append(_View(si, l2_normalize(s.q), l2_normalize(s.db), s.dataset))
            continue
        if spec.fit == "validation":
            w = learned((full, "all"), lambda: _learn(full, sets, None))
        else:
            w = learned((full, "set", si), lambda: fit_database_whitening(full, s.db))
        views.append(_View(si, w.apply(s.q), w.apply(s.db), s.dataset))
    return views


# ----------------------------------------------------------------------------- re-ranking steps


def _score_rerank(views: Sequence[_View], n_sets: int, qe_k: int, dba_k: int, diff: dict | None,
                  dba_cache: dict, verify: VerifyParams | None = None,
                  verifiers: Sequence[Any] | None = None) -> float:
    values = []
    for vi, v in enumerate(views):
        key = (vi, dba_k)
        if key not in dba_cache:
            dba_cache[key] = dba(v.db, dba_k, alpha=ALPHA) if dba_k > 1 else v.db
        db = dba_cache[key]
        q = v.q
        if verify is not None:  # the chain of rerank.compose: search -> verify -> verified expansion
            verifier = verifiers[v.set_index]
            rows = np.arange(len(q)) if v.qrows is None else np.asarray(v.qrows)
            top, inliers = verify_top(q @ db.T, verify.k, lambda i, cand: verifier(int(rows[i]), cand))
            if verify.expand:
                q = expand_queries(q, db, top, inliers, verify)
        q = alpha_qe(q, db, qe_k, alpha=ALPHA) if qe_k > 0 else q
        scores = q @ db.T
        if diff is not None:
            p = DiffusionParams.for_database(db.shape[0], **diff)
            gkey = (vi, dba_k, p.k, p.gamma, p.mutual)
            if gkey not in v.graphs:
                v.graphs[gkey] = knn_graph(db, k=p.k, gamma=p.gamma, mutual=p.mutual)
            scores = diffusion_scores(q, db, p, graph=v.graphs[gkey], sim=scores)
        if verify is not None and verify.order != "none":
            scores = order_verified(scores, top, inliers, verify)
        values.append(score_of(v.dataset, scores))
    return _mean_over_sets(views, values, n_sets)


def tune(
    sets: Sequence[LabelledSet],
    grid: Grid = Grid(),
    progress: Callable[[str], None] | None = None,
) -> tuple[Recipe, list[dict[str, Any]]]:
    """Search whitening and re-ranking on the validation ``sets`` -> (recipe, trials).

    ``trials``: one record per candidate (step, settings, objective). The recipe's learned
    whitening (if chosen) is learned again on all pairs / vectors of all sets.
    """
    if not sets:
        raise ValueError("tune needs at least one labelled validation set")
    dims = {s.db.shape[1] for s in sets} | {s.q.shape[1] for s in sets}
    if len(dims) != 1:
        raise ValueError(f"validation descriptors differ in dimension: {sorted(dims)}")
    say = progress or (lambda _msg: None)
    n_sets = len(sets)
    trials: list[dict[str, Any]] = []

    best_spec, best_views, best = None, None, -np.inf
    memo: dict = {}
    for spec in _whitening_candidates(grid):
        if spec.dim is not None and spec.dim >= next(iter(dims)):
            continue  # the same as dim = all
        try:
            views = _views(spec, sets, grid, memo)
        except (ValueError, np.linalg.LinAlgError) as exc:
            trials.append({"step": "whitening", "whitening": spec.to_dict(), "error": str(exc)})
            continue
        value = _score_rerank(views, n_sets, 0, 0, None, {})
        trials.append({"step": "whitening", "whitening": spec.to_dict(), "objective": value})
        say(f"whitening {spec.label()}: {value:.2f}")
        if value > best + (grid.min_gain if best_spec is not None else 0):
            best_spec, best_views, best = spec, views, value
    assert best_spec is not None and best_views is not None

    dba_cache: dict = {}
    best_qe, best_dba = 0, 0
    for dba_k, qe_k in itertools.product(grid.dba, grid.qe):
        value = _score_rerank(best_views, n_sets, qe_k, dba_k, None, dba_cache)
        trials.append({"step": "qe/dba", "qe": qe_k, "dba": dba_k, "objective": value})
        say(f"alpha-QE {qe_k}, DBA {dba_k}: {value:.2f}")
        if value > best + grid.min_gain:
            best_qe, best_dba, best = qe_k, dba_k, value

    best_diff: dict | None = None
    for k, kq, a, w in itertools.product(grid.diffusion_k, grid.diffusion_kq, grid.diffusion_alpha,
                                         grid.diffusion_sim_weight):
        diff = {"kq": kq, "alpha": a, "sim_weight": w} | ({} if k is None else {"k": k})
        value = _score_rerank(best_views, n_sets, best_qe, best_dba, diff, dba_cache)
        trials.append({"step": "diffusion", "diffusion": diff, "objective": value})
        say(f"diffusion {diff}: {value:.2f}")
        if value > best + grid.min_gain:
            best_diff, best = diff, value

    best_verify: VerifyParams | None = None
    verifiers = [s.verifier for s in sets]
    if grid.verify and all(vf is not None for vf in verifiers):
        for vp in grid.verify:
            value = _score_rerank(best_views, n_sets, best_qe, best_dba, best_diff, dba_cache, vp, verifiers)
            trials.append({"step": "verify", "verify": vp.to_dict(), "objective": value})
            say(f"verify top {vp.k}, order {vp.order}, expansion {'on' if vp.expand else 'off'}: {value:.2f}")
            if value > best + grid.min_gain:
                best_verify, best = vp, value
    elif grid.verify and any(vf is not None for vf in verifiers):
        trials.append({"step": "verify", "error": "skipped: not every validation set has a verifier"})

    learned = None
    if best_spec.method != "none" and best_spec.fit == "validation":
        learned = _learn(best_spec, sets, None)
    memo.clear()
    rerank = Rerank(qe=best_qe, alpha_qe=ALPHA if best_qe else None, dba=best_dba,
                    dba_alpha=ALPHA if best_dba else None, diffusion=best_diff, verify=best_verify)
    meta = {
        "tuned_on": [{"name": s.name, "n_db": int(s.db.shape[0]), "n_queries": int(s.q.shape[0]),
                      "protocol": s.dataset.protocol} for s in sets],
        "objective": {"value": best, "what": "mean over sets of (Medium + Hard) / 2 mAP (Medium alone "
                      "without hard positives; mAP for folder sets)", "trials": len(trials)},
    }
    return Recipe(spec=best_spec, rerank=rerank, learned=learned, meta=meta), trials
