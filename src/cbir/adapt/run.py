"""``cbir adapt``'s driver: a recipe for a collection nobody labelled, learned from its own photos.

    recipe, report = adapt("photos/", AdaptSettings())
    recipe.save("photos.recipe.json")        # cbir evaluate/search/index build/serve --recipe

Steps (the method's classical half used to adapt rather than to train; Radenović et al., TPAMI'18):

1. mine verified pairs inside the folder with :func:`cbir.sfm.verified.verified_pairs` (global
   descriptors through the extraction cache, each photo's k nearest neighbours, local features,
   matching + RANSAC inlier counts, clusters with weak bridges cut); the work is kept in the cache
   folder (:mod:`cbir.adapt.work`), so a rerun, or a run killed midway, continues it;
2. the pseudo ground truth and the held-out folds of :mod:`cbir.adapt.pseudo`: every photo with a
   verified partner is a query, its positives are the photos of its cluster (or its verified
   partners); the clusters are split into 2 folds;
3. learned whitening (Lw, :func:`cbir.whitening.learn_lw`, ``lw_dim``, ``lw_shrinkage``) from the
   matching pairs of one fold, applied to every photo; the queries of the other fold are the
   validation set of that whitening (and the other way round): 2 sets, neither judged on the pairs
   it was learned from;
4. the re-ranking (alpha-QE, DBA, diffusion; verification with ``verify``) chosen by
   :func:`cbir.rerank.tune.tune` on those 2 sets (the mean of their pseudo-ground-truth mAP);
5. the recipe: Lw learned again on every matching pair + the chosen re-ranking.

Only image files are opened (:func:`cbir.sfm.mine.collect_photos` lists the folder by file name);
no label, no ground-truth file, nothing else in the folder is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .pseudo import cluster_folds, matching_pairs, positive_lists, pseudo_gnd, verified_edges
from .settings import AdaptSettings
from .work import work_dir_for

__all__ = ["adapt", "AdaptReport", "TooFewPairs"]

#: ``progress(stage, done, total)``: the stages of :func:`cbir.sfm.verified.verified_pairs`, then
#: "whitening" and "tune" (one unit per trial).
Progress = Callable[[str, int, int], None]


class TooFewPairs(ValueError):
    """The folder's photos give too few verified pairs (or clusters) to learn from."""


@dataclass
class AdaptReport:
    """What :func:`adapt` found and chose (JSON-ready through :meth:`to_dict`)."""

    folder: str
    photos: int
    unreadable: int
    other_files: int
    candidate_pairs: int
    verified_pairs: int
    clusters: int
    clustered_photos: int
    queries: int
    matching_pairs: int
    whitening: dict[str, Any]
    rerank: dict[str, Any]
    pseudo_gt: dict[str, float]
    folds: list[dict[str, int]]
    work_dir: str
    seconds: dict[str, float]
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, trials: bool = False) -> dict[str, Any]:
        d = dict(self.__dict__)
        if not trials:
            d.pop("trials")
        return d


def _grid(settings: AdaptSettings):
    """The re-ranking search: no whitening step (the Lw is fixed, applied before), the rest as
    ``cbir tune`` (``fast``: as ``cbir tune --fast``); verification only with ``settings.verify``."""
    from ..rerank.tune import Grid
    from ..rerank.verify import VerifyParams

    if settings.search == "fast":
        g = Grid(pca_power=(), shrinkage=(), dims=(), lw=False, qe=(0, 2), dba=(0, 3), diffusion_k=(None,),
                 diffusion_kq=(3,), diffusion_alpha=(0.8,), diffusion_sim_weight=(0.5,),
                 verify=(VerifyParams(k=50, order="first", expand=True),))
    else:
        g = Grid(pca_power=(), shrinkage=(), dims=(), lw=False)
    if not settings.verify:
        from dataclasses import replace

        g = replace(g, verify=())
    return g


def adapt(
    folder: str | os.PathLike[str],
    settings: AdaptSettings | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    workers: int = 1,
    progress: Progress | None = None,
    exclude: str | os.PathLike[str] | None = None,
):
    """Mine ``folder``, learn Lw from its verified pairs, tune the re-ranking on them (module doc)
    -> (:class:`cbir.rerank.recipe.Recipe`, :class:`AdaptReport`). Nothing is written but the
    mining work under ``cache_dir`` (default: cbir's cache folder); ``recipe.save(path)`` writes
    the recipe. ``exclude``: a folder under ``folder`` whose files are not photos of the
    collection (e.g. where the recipe goes). :class:`TooFewPairs` when there is too little to learn.
    """
    import time

    from ..datasets.base import RetrievalDataset
    from ..pipeline.cache import default_cache_dir
    from ..rerank.recipe import Recipe, WhiteningSpec
    from ..rerank.tune import LabelledSet, score_of, tune
    from ..sfm.mine import collect_photos
    from ..sfm.state import SettingsChanged
    from ..sfm.verified import verified_pairs
    from ..whitening import learn_lw

    settings = settings or AdaptSettings()
    root = Path(folder)
    names, paths, other = collect_photos(root, exclude=exclude)
    if len(names) < 3:
        raise TooFewPairs(f"{root}: {len(names)} photo(s); adapt needs at least 3 (and verified pairs among them)")
    cache_root = Path(default_cache_dir() if cache_dir is None else cache_dir).expanduser()
    work = work_dir_for(root, settings.pairs, cache_root)
    kw = dict(keys=names, progress=progress, device=device, workers=workers, cache_dir=cache_root)
    try:
        vp = verified_pairs(paths, settings.pairs, work, **kw)
    except SettingsChanged:  # the photos of the folder changed since: the work is redone
        vp = verified_pairs(paths, settings.pairs, work, restart=True, **kw)
    times = dict(vp.times)

    t0 = time.perf_counter()
    n = len(names)
    edges = verified_edges(vp.pairs, vp.inliers, vp.min_inliers, vp.cut)
    pos = positive_lists(n, edges, vp.clusters, settings.positives)
    rule = settings.positives if settings.search_positives == "same" else settings.search_positives
    pos_search = pos if rule == settings.positives else positive_lists(n, edges, vp.clusters, rule)
    ok = np.flatnonzero(vp.ok)
    fold = cluster_folds(vp.clusters, 2)
    n_clusters = int(len(np.unique(vp.clusters[vp.clusters >= 0])))
    if len(edges) < settings.min_pairs or n_clusters < 2:
        raise TooFewPairs(f"{root}: {len(edges)} verified pair(s) in {n_clusters} cluster(s) among {n} photos; adapt "
                          f"needs at least {settings.min_pairs} pairs in 2 clusters (more photos of the same places, "
                          "or a lower --min-inliers)")
    x = vp.vectors.astype(np.float32)
    dim = None if settings.lw_dim is None else min(int(settings.lw_dim), x.shape[1])
    row_of = {int(p): r for r, p in enumerate(ok)}  # photo -> database row (readable photos only)

    def learned_on(photos) -> Any:
        pairs = matching_pairs(pos, photos)
        if len(pairs) == 0:
            raise TooFewPairs(f"{root}: a fold of the verified clusters has no matching pair: too few to hold out")
        return learn_lw(x, pairs, dim=dim, shrinkage=settings.lw_shrinkage), len(pairs)

    sets, folds_doc, raw_values = [], [], []
    for f in (0, 1):
        learn_photos = np.flatnonzero(fold == f)
        judge_photos = np.flatnonzero(fold == 1 - f)
        w, n_pairs = learned_on(learn_photos)
        queries, gnd = pseudo_gnd(pos_search, judge_photos)
        gnd = [{**g, "easy": [row_of[j] for j in g["easy"]], "junk": [row_of[j] for j in g["junk"]]} for g in gnd]
        ds = RetrievalDataset(
            name=f"{root.name or root}: pseudo ground truth, fold {1 - f} (Lw from fold {f})", protocol="revisitop",
            db_ids=[names[i] for i in ok], db_paths=[paths[i] for i in ok], query_ids=[names[i] for i in queries],
            query_paths=[paths[i] for i in queries], query_bboxes=[None] * len(queries), gnd=gnd,
            info={"pseudo_gt": rule})
        verifier = None
        if settings.verify:
            from ..pipeline.verifying import benchmark_verifier

            verifier = benchmark_verifier(ds, cache_dir=cache_root, crop=False, workers=workers,
                                          device=device if str(device).startswith("cuda") else "cpu")
        raw_values.append((len(queries), score_of(ds, x[queries] @ x[ok].T)))
        sets.append(LabelledSet(ds.name, w.apply(x[queries]), w.apply(x[ok]), ds, verifier))
        folds_doc.append({"learned_on_photos": int(len(learn_photos)), "learned_on_pairs": int(n_pairs),
                          "judged_queries": len(queries)})
        if progress is not None:
            progress("whitening", 1, 2)
    times["whitening"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    grid = _grid(settings)
    n_trials = (len(grid.dba) * len(grid.qe) + len(grid.diffusion_k) * len(grid.diffusion_kq)
                * len(grid.diffusion_alpha) * len(grid.diffusion_sim_weight) + len(grid.verify) + 1)
    tuned, trials = tune(sets, grid, progress=(lambda _msg: progress("tune", 1, n_trials)) if progress else None)
    times["tune"] = time.perf_counter() - t0

    all_pairs = matching_pairs(pos, None)
    lw = learn_lw(x, all_pairs, dim=dim, shrinkage=settings.lw_shrinkage)
    spec = WhiteningSpec("lw", "validation", shrinkage=float(settings.lw_shrinkage), dim=dim)
    lw_only = next(t["objective"] for t in trials if t.get("step") == "whitening")
    raw = float(np.mean([v for _, v in raw_values]))
    pseudo = {"raw": round(raw, 2), "lw": round(float(lw_only), 2), "recipe": round(float(tuned.meta["objective"]["value"]), 2)}
    imsize, scales = settings.pairs.resolution()  # as verified_pairs made the descriptors
    meta = {
        "tuned_on": [{"name": f"cbir adapt {root.name or root}", "photos": n, "verified_pairs": int(len(edges)),
                      "clusters": n_clusters, "queries": int(sum(d["judged_queries"] for d in folds_doc)),
                      "pseudo_gt": rule, "whitening_pairs": settings.positives, "protocol": "revisitop (Medium)"}],
        "objective": {"value": float(tuned.meta["objective"]["value"]),
                      "what": "pseudo ground truth from verified pairs: mean over 2 cluster folds of the Medium mAP "
                              "of one fold's photos, with Lw learned on the other fold's pairs",
                      "trials": len(trials), "raw": raw, "lw": float(lw_only)},
        "descriptors": {"model": settings.pairs.model, "pooling": settings.pairs.pooling,
                        "weights": settings.pairs.weights, "imsize": imsize, "scales": list(scales)},
    }
    recipe = Recipe(spec=spec, rerank=tuned.rerank, learned=lw, meta=meta)
    n_clustered = int((vp.clusters >= 0).sum())
    report = AdaptReport(
        folder=str(root), photos=n, unreadable=int(n - len(ok)), other_files=int(other),
        candidate_pairs=int(len(vp.pairs)), verified_pairs=int(len(edges)), clusters=n_clusters,
        clustered_photos=n_clustered, queries=meta["tuned_on"][0]["queries"], matching_pairs=int(len(all_pairs)),
        whitening={**spec.to_dict(), "out_dim": int(lw.out_dim)}, rerank=tuned.rerank.to_dict(), pseudo_gt=pseudo,
        folds=folds_doc, work_dir=str(work), seconds={k: round(float(v), 1) for k, v in times.items()},
        trials=trials)
    return recipe, report
