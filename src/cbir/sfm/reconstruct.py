"""Structure from motion per cluster: a COLMAP database of the mined features and verified matches,
then pycolmap's incremental mapping; what it gives the tuples is the number of 3D points two photos
share.

For a cluster (photos joined by verified pairs, :mod:`cbir.sfm.graph`):

1. ``database.db`` (``pycolmap.Database``): one camera per photo (SIMPLE_RADIAL, focal 1.2 max(w, h),
   principal point at the centre: COLMAP's guess without EXIF focal), the stored keypoints
   (x, y, scale, orientation in original pixels) and descriptors (uint8) of
   :class:`cbir.local.store.LocalFeatureStore`, and for every verified pair of the cluster its RANSAC
   inlier correspondences, written both as matches and as the two-view geometry's inlier matches
   (configuration UNCALIBRATED: the mapper estimates the relative poses itself);
2. ``pycolmap.incremental_mapping`` (one thread, seeded: the same cluster gives the same models),
   possibly several models per cluster, the ones of at least ``min_model_images`` registered photos kept;
3. for every model, every 3D point's track names the photos that see it; two photos *share* the
   points whose tracks hold both: s_ij = |{X : i in track(X) and j in track(X)}| (the SfM evidence
   of Radenović et al., TPAMI'18, where positives are chosen among photos that share 3D points with
   the query). A pair in several models keeps its largest count.

Written in ``DIR/<cluster>/``: ``database.db``, ``models/<k>/`` (COLMAP binary models), and last,
atomically, ``result.json`` (format ``cbir-mine-cluster`` v1), the mark that the cluster is done: a
killed run redoes only the cluster it was in (its folder is emptied first).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..fileio import FormatError, atomic_write_json, check_format, read_json

if TYPE_CHECKING:
    from ..local.features import LocalFeatures

__all__ = ["ClusterModels", "MapperSettings", "write_database", "map_cluster", "shared_points", "reconstruct_cluster",
           "load_cluster_result"]

RESULT = "result.json"
RESULT_FORMAT = "cbir-mine-cluster"
RESULT_VERSION = 1


@dataclass(frozen=True)
class MapperSettings:
    """The incremental mapper's options cbir sets (the rest are COLMAP's defaults)."""

    min_model_images: int = 3
    min_matches: int = 15
    init_min_inliers: int = 50
    abs_pose_min_inliers: int = 15
    max_seconds: int = -1
    seed: int = 0


@dataclass
class ClusterModels:
    """What mapping one cluster gave: ``images`` the cluster's photo indices; ``models`` one dict
    per kept model (``images`` registered photo indices, ``points`` 3D points, ``observations``,
    ``reprojection_error`` mean, pixels); ``shared`` (S, 3) int64 rows (i, j, s_ij), i < j, s_ij > 0."""

    cluster: int
    images: list[int]
    models: list[dict[str, Any]]
    shared: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT, "format_version": RESULT_VERSION, "cluster": int(self.cluster),
                "images": [int(i) for i in self.images], "models": self.models,
                "shared": [[int(a), int(b), int(c)] for a, b, c in self.shared]}


def write_database(path: str | os.PathLike[str], names: Sequence[str], features: Sequence["LocalFeatures"],
                   matches: dict[tuple[int, int], np.ndarray]) -> list[int]:
    """A new COLMAP database at ``path`` (an existing file is replaced) of photos ``names`` with their
    ``features`` and the verified ``matches`` {(a, b): (K, 2) keypoint rows} between positions a < b
    of those lists. Returns the database image id of each photo."""
    import pycolmap

    path = Path(path)
    if path.exists():
        path.unlink()
    db = pycolmap.Database.open(str(path))
    try:
        ids = []
        sift = pycolmap.FeatureExtractorType.SIFT
        for name, f in zip(names, features):
            w, h = f.size
            cam = pycolmap.Camera.create_from_model_name(0, "SIMPLE_RADIAL", 1.2 * max(w, h), w, h)
            cid = db.write_camera(cam)
            iid = db.write_image(pycolmap.Image(name=str(name), camera_id=cid))
            db.write_keypoints(iid, np.ascontiguousarray(f.keypoints, dtype=np.float32))
            db.write_descriptors(iid, pycolmap.FeatureDescriptors(sift, np.ascontiguousarray(f.descriptors)))
            ids.append(int(iid))
        for (a, b), m in sorted(matches.items()):
            m = np.ascontiguousarray(np.asarray(m).reshape(-1, 2), dtype=np.uint32)
            db.write_matches(ids[a], ids[b], m)
            geom = pycolmap.TwoViewGeometry()
            geom.config = pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED
            geom.inlier_matches = m
            db.write_two_view_geometry(ids[a], ids[b], geom)
    finally:
        db.close()
    return ids


def _options(settings: MapperSettings) -> Any:
    import pycolmap

    o = pycolmap.IncrementalPipelineOptions()
    o.num_threads = 1
    o.random_seed = int(settings.seed)
    o.mapper.num_threads = 1
    o.mapper.random_seed = int(settings.seed)
    o.triangulation.random_seed = int(settings.seed)
    o.min_model_size = int(settings.min_model_images)
    o.min_num_matches = int(settings.min_matches)
    o.mapper.init_min_num_inliers = int(settings.init_min_inliers)
    o.mapper.abs_pose_min_num_inliers = int(settings.abs_pose_min_inliers)
    o.max_runtime_seconds = int(settings.max_seconds)
    o.extract_colors = False
    o.multiple_models = True
    return o


def map_cluster(database: str | os.PathLike[str], out_dir: str | os.PathLike[str], settings: MapperSettings) -> dict:
    """``pycolmap.incremental_mapping`` of ``database`` into ``out_dir/<k>/`` -> {k: Reconstruction}
    (COLMAP's log held back: a cluster that gives no model is an ordinary outcome, not an error)."""
    import pycolmap

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 3  # FATAL only
    try:
        return dict(pycolmap.incremental_mapping(str(database), str(out_dir), str(out_dir), _options(settings)))
    finally:
        pycolmap.logging.minloglevel = level


def shared_points(rec: Any, image_index: dict[int, int]) -> dict[tuple[int, int], int]:
    """{(i, j): s_ij} over the 3D points of ``rec`` (a pycolmap Reconstruction), i < j the photo
    indices that ``image_index`` gives the database image ids (module docstring)."""
    counts: dict[tuple[int, int], int] = {}
    for point in rec.points3D.values():
        seen = sorted({image_index[int(e.image_id)] for e in point.track.elements})
        for x in range(len(seen)):
            for y in range(x + 1, len(seen)):
                key = (seen[x], seen[y])
                counts[key] = counts.get(key, 0) + 1
    return counts


def reconstruct_cluster(folder: str | os.PathLike[str], cluster: int, images: Sequence[int], names: Sequence[str],
                        features: Sequence["LocalFeatures"], matches: dict[tuple[int, int], np.ndarray],
                        settings: MapperSettings) -> ClusterModels:
    """Database, mapping and shared points of one cluster in ``folder`` (emptied first), result.json last.

    ``images``: the cluster's photo indices; ``names``/``features``: theirs, in that order;
    ``matches``: {(a, b): correspondences} between positions a < b of ``images``.
    """
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ids = write_database(folder / "database.db", names, features, matches)
    index = {iid: int(images[pos]) for pos, iid in enumerate(ids)}
    recs = map_cluster(folder / "database.db", folder / "models", settings)
    models: list[dict[str, Any]] = []
    shared: dict[tuple[int, int], int] = {}
    for k in sorted(recs):
        rec = recs[k]
        reg = sorted(index[int(i)] for i in rec.reg_image_ids())
        if len(reg) < settings.min_model_images:
            continue
        models.append({"model": int(k), "images": reg, "points": int(rec.num_points3D()),
                       "observations": int(rec.compute_num_observations()),
                       "reprojection_error": round(float(rec.compute_mean_reprojection_error()), 4)})
        for key, c in shared_points(rec, index).items():
            shared[key] = max(shared.get(key, 0), c)
    rows = np.asarray([(a, b, c) for (a, b), c in sorted(shared.items())], dtype=np.int64).reshape(-1, 3)
    result = ClusterModels(cluster=int(cluster), images=[int(i) for i in images], models=models, shared=rows)
    atomic_write_json(folder / RESULT, result.to_dict())
    return result


def load_cluster_result(folder: str | os.PathLike[str]) -> ClusterModels | None:
    """The finished result of a cluster folder, or None when it has none (not done)."""
    path = Path(folder) / RESULT
    if not path.is_file():
        return None
    doc = read_json(path, what="mined cluster result")
    check_format(doc, RESULT_FORMAT, (RESULT_VERSION,), path, "cbir mined cluster result")
    try:
        shared = np.asarray(doc["shared"], dtype=np.int64).reshape(-1, 3)
        images = [int(i) for i in doc["images"]]
        models = [dict(m) for m in doc["models"]]
        for m in models:
            m["images"] = [int(i) for i in m["images"]]
        cluster = int(doc["cluster"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: bad mined cluster result ({exc})") from exc
    if len(shared) and (shared[:, 2] < 1).any():
        raise FormatError(f"{path}: shared point counts must be positive")
    return ClusterModels(cluster=cluster, images=images, models=models, shared=shared)
