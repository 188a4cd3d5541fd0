"""``cbir mine``'s driver: training tuples from a folder of unlabelled photos, resumable.

    summary = mine("photos/", "mined/", MineSettings())

Steps (each one's output written atomically in ``OUT``; a rerun skips what is done):

1. the verified-pair stage, :func:`cbir.sfm.verified.verified_pairs` in ``OUT/pairs/`` (describe,
   candidate pairs, local features, verification, clusters);
2. ``reconstruct``: pycolmap incremental mapping of every cluster of >= ``min_model_images`` photos,
   :func:`cbir.sfm.reconstruct.reconstruct_cluster` in ``OUT/reconstruct/<cluster>/``, one cluster
   at a time, the largest first;
3. ``tuples``: ``OUT/tuples.pkl`` (:mod:`cbir.sfm.tuples`: positives with their inlier counts and
   shared 3D points, a held-out ``val`` split of whole clusters) and ``OUT/val_gnd.pkl`` (the val
   split as a revisitop ground truth, for training's validation);
4. ``OUT/summary.json`` (last): photos, candidate and verified pairs, clusters, 3D models,
   registered photos, tuples, seconds per stage.

Photos: the image files under ``FOLDER`` by the rule of :mod:`cbir.collection` (hidden files, non-images
and the output folder skipped), named by their path relative to ``FOLDER``. No label
and no ground-truth file is ever read. ``OUT/state.json`` stamps the settings and the photo list:
a rerun with other settings or other photos is refused in one line (``restart=True`` empties OUT
and starts over). RANSAC and the mapper are seeded and single-threaded, so a killed-and-resumed
run writes the same tuples and summary (times aside) as an uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_json
from .reconstruct import MapperSettings, load_cluster_result, reconstruct_cluster
from .settings import MineSettings
from .state import WorkDir
from .tuples import build_tuples, positive_pairs, validation_gnd, write_pickle
from .verified import Progress, VerifiedPairs, verified_pairs

__all__ = ["mine", "collect_photos", "SUMMARY", "TUPLES", "VAL_GND"]

SUMMARY = "summary.json"
TUPLES = "tuples.pkl"
VAL_GND = "val_gnd.pkl"


def collect_photos(folder: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None
                   ) -> tuple[list[str], list[Path], int]:
    """(names relative to ``folder`` with extension, paths, number of other files skipped), sorted: the
    photos of :func:`cbir.collection.walk_folder` (the one rule of every command)."""
    from ..collection import walk_folder

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"photo folder not found: {root}")
    paths, others = walk_folder(root, exclude)
    names = [f.relative_to(root).as_posix() for f in paths]
    other = len(others)
    if not paths:
        raise ValueError(f"{root}: no photos (image files: .jpg, .png, ...) found")
    return names, paths, other


def mine(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: MineSettings | None = None,
    *,
    progress: Progress | None = None,
    device: str = "auto",
    workers: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Mine ``folder`` into ``out`` (module docstring); returns the summary (also ``out/summary.json``).

    ``progress(stage, done, total)``: stages describe, pairs, features, verify, graph, reconstruct,
    tuples. ``workers``: SIFT processes. SettingsChanged (one line) when ``out`` holds a run with
    other settings or photos, unless ``restart``.
    """
    settings = settings or MineSettings()
    out = Path(out)
    names, paths, other = collect_photos(folder, exclude=out)
    wd = WorkDir(out, "cbir mine", settings.to_dict(), [names], restart=restart)
    vp = verified_pairs(paths, settings.pairs, out / "pairs", keys=names, progress=progress, device=device,
                        workers=workers, cache_dir=cache_dir)
    results = _reconstruct(wd, vp, settings, progress) if settings.reconstruct else []
    shared = np.concatenate([r.shared for r in results]) if results else np.zeros((0, 3), dtype=np.int64)
    with wd.timed("tuples"):
        positives = positive_pairs(vp.clusters, vp.pairs, vp.inliers, vp.min_inliers, vp.cut, shared,
                                   settings.min_shared_points)
        doc = build_tuples(names, vp.clusters, positives, settings.val_fraction, settings.seed)
        if not (out / TUPLES).is_file():
            write_pickle(out / TUPLES, doc)
        if not (out / VAL_GND).is_file() and doc["val"]["cids"]:
            write_pickle(out / VAL_GND, validation_gnd(doc["val"]))
    if progress is not None:
        progress("tuples", 1, 1)
    summary = _summary(folder, out, vp, results, positives, doc, other, settings, {**vp.times, **wd.times()})
    atomic_write_json(out / SUMMARY, summary)
    return summary


def _reconstruct(wd: WorkDir, vp: VerifiedPairs, settings: MineSettings, progress: Progress | None) -> list:
    """Every cluster of >= min_model_images photos mapped (done ones read back), largest first."""
    from ..local.store import LocalFeatureStore

    ids, sizes = np.unique(vp.clusters[vp.clusters >= 0], return_counts=True)
    chosen = [int(c) for c, s in sorted(zip(ids, sizes), key=lambda t: (-t[1], t[0])) if s >= settings.min_model_images]
    total = int(sum(int((vp.clusters == c).sum()) for c in chosen))
    mapper = MapperSettings(min_model_images=settings.min_model_images, min_matches=vp.min_inliers,
                            init_min_inliers=settings.init_min_inliers,
                            abs_pose_min_inliers=settings.abs_pose_min_inliers, max_seconds=settings.max_seconds,
                            seed=settings.seed)
    cut = set(vp.cut.tolist())
    store = None
    results = []
    for c in chosen:
        folder = wd.path / "reconstruct" / f"c{c:06d}"
        images = [int(i) for i in np.flatnonzero(vp.clusters == c)]
        res = load_cluster_result(folder)
        if res is None or res.images != images:
            if store is None:
                store = LocalFeatureStore(vp.store)
            pos = {g: i for i, g in enumerate(images)}
            edges = [int(p) for p in vp.verified if int(p) not in cut and int(vp.pairs[p, 0]) in pos
                     and int(vp.pairs[p, 1]) in pos]
            found = vp.matches_many(edges)
            matches = {(pos[int(vp.pairs[p, 0])], pos[int(vp.pairs[p, 1])]): found[p] for p in edges}
            with wd.timed("reconstruct"):
                res = reconstruct_cluster(folder, c, images, [vp.keys[i] for i in images],
                                          [store.get(vp.keys[i]) for i in images], matches, mapper)
        members = set(images)
        if len(res.shared) and not set(res.shared[:, :2].ravel().tolist()) <= members:
            raise ValueError(f"{folder}: shared points name photos outside cluster {c} (damaged result; "
                             "delete the folder to redo it)")
        results.append(res)
        if progress is not None:
            progress("reconstruct", len(images), total)
    return results


def _summary(folder: Any, out: Path, vp: VerifiedPairs, results: list, positives: dict, doc: dict, other: int,
             settings: MineSettings, times: dict[str, float]) -> dict[str, Any]:
    ids, sizes = np.unique(vp.clusters[vp.clusters >= 0], return_counts=True)
    models = [m for r in results for m in r.models]
    registered = sorted({i for m in models for i in m["images"]})
    three_d_only = sum(1 for n, s in positives.values() if n == 0 and s > 0)
    split = {name: {"photos": len(doc[name]["cids"]), "clusters": len(set(doc[name]["cluster"])),
                    "pairs": len(doc[name]["qidxs"])} for name in ("train", "val")}
    return {
        "folder": str(folder), "out": str(out),
        "photos": len(vp.keys), "failed": len(vp.failed), "other_files": int(other),
        "candidate_pairs": int(len(vp.pairs)), "verified_pairs": int(len(vp.verified)),
        "cut_bridges": int(len(vp.cut)),
        "clusters": int(len(ids)), "clustered_photos": int(sizes.sum()) if len(sizes) else 0,
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        "cluster_sizes": {str(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))} if len(sizes) else {},
        "reconstructed_clusters": len(results), "models": len(models), "registered_photos": len(registered),
        "points3D": int(sum(m["points"] for m in models)),
        "positive_pairs": len(positives), "positive_pairs_3d_only": int(three_d_only),
        "train": split["train"], "val": split["val"],
        "seconds": {k: round(float(v), 1) for k, v in times.items()},
        "settings": settings.to_dict(),
        "failed_photos": dict(sorted(vp.failed.items())),
    }
