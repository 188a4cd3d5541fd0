"""Training data: image lists with cluster (or class) ids, and per-epoch tuples built from them.

Three sources reduce to one :class:`TrainingImages` (paths, one cluster id per image, the query
images and each query's candidate positives):

* the **retrieval-SfM-120k** format (Radenović et al.): a pickled dict ``{split: {"cids",
  "cluster", "qidxs", "pidxs"}}``; image ``cid`` lives at ``ROOT/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``
  (``layout="cid"``, the published layout) or ``ROOT/cid`` (``layout="flat"``); queries are
  ``qidxs``, the positives of a query every ``pidxs`` paired with it. Files written by ``cbir mine``
  (:mod:`cbir.sfm.tuples`) also carry the evidence of each (query, positive) pair, ``pinliers``
  (RANSAC inliers) and ``p3d`` (shared 3D points), lists parallel to ``qidxs``: kept in
  :attr:`TrainingImages.evidence` for the positive rules of :func:`build_epoch_tuples`;
* a **folder per class** (``ROOT/<class>/<image>``);
* a **CSV** of image and label (header naming an image column ``image``/``path``/``id`` and a
  label column ``label``/``class``/``landmark_id``; an ``id`` without extension is found in the
  Google-Landmarks-v2 layout ``ROOT/i/d/x/idx….jpg``).

For labelled data every image of a class with at least two members is a query and its positives
are the other members. :func:`build_epoch_tuples` then mines, with the current model, one positive
and ``k`` diverse hard negatives per query (:mod:`cbir.training.mining`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..datasets.revisitop import load_plain_pickle
from ..extraction.images import IMAGE_EXTENSIONS
from ..fileio import FormatError
from .mining import class_consistency_mask, hardest_positive, mine_diverse_negatives, positive_by_evidence

__all__ = [
    "IMAGE_EXTENSIONS",
    "TrainingImages",
    "from_labels",
    "load_sfm",
    "load_class_folder",
    "load_class_csv",
    "load_training_images",
    "clean_classes",
    "split_classes",
    "split_images",
    "HeldOut",
    "split_for_validation",
    "build_epoch_tuples",
    "POSITIVE_RULES",
    "clean_by_verification",
    "square_tensor",
    "TupleDataset",
    "ImageDataset",
]



@dataclass
class TrainingImages:
    """Images with cluster ids, the query images and their candidate positives.

    paths: N image files; clusters: (N,) int64 cluster/class id of each; queries: (Q,) int64
    indices of query images; positives: Q arrays of candidate positive indices (never empty);
    class_names: the label of each cluster id, when the data had names; evidence: for mined data,
    Q arrays (len(positives[q]), 2) int64 of (inlier count, shared 3D points) of each candidate
    positive (None when the data have no such evidence).
    """

    paths: list[Path]
    clusters: np.ndarray
    queries: np.ndarray
    positives: list[np.ndarray]
    class_names: list[str] | None = None
    evidence: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.clusters = np.asarray(self.clusters, dtype=np.int64)
        self.queries = np.asarray(self.queries, dtype=np.int64)
        if self.clusters.shape != (len(self.paths),):
            raise ValueError(f"need one cluster id per image: {len(self.paths)} images, {self.clusters.shape} ids")
        if len(self.positives) != len(self.queries):
            raise ValueError(f"need the positives of every query: {len(self.queries)} queries, {len(self.positives)} lists")
        if len(self.queries) == 0:
            raise ValueError("training data has no query with a positive (need classes/clusters of at least two images)")
        if self.evidence is not None and (len(self.evidence) != len(self.positives) or any(
                np.shape(e) != (len(p), 2) for e, p in zip(self.evidence, self.positives))):
            raise ValueError("evidence must hold one (inliers, shared 3D points) row per candidate positive")

    @property
    def n_clusters(self) -> int:
        return len(np.unique(self.clusters))

    def subset(self, indices: Sequence[int]) -> "TrainingImages":
        """The images at ``indices`` (in that order); queries and positives restricted to them
        (a query left without positives is dropped)."""
        idx = np.asarray(indices, dtype=np.int64)
        new = np.full(len(self.paths), -1, dtype=np.int64)
        new[idx] = np.arange(len(idx))
        queries, positives, evidence = [], [], []
        for s, (q, ps) in enumerate(zip(self.queries, self.positives)):
            if new[q] < 0:
                continue
            mask = new[ps] >= 0
            if mask.any():
                queries.append(new[q])
                positives.append(new[ps][mask])
                if self.evidence is not None:
                    evidence.append(self.evidence[s][mask])
        return TrainingImages([self.paths[i] for i in idx], self.clusters[idx], np.asarray(queries, dtype=np.int64),
                              positives, self.class_names, evidence if self.evidence is not None else None)

    def cluster_members(self, i: int) -> np.ndarray:
        """Indices of the other images of image i's cluster."""
        m = np.flatnonzero(self.clusters == self.clusters[i])
        return m[m != i]


def from_labels(paths: Sequence[str | os.PathLike[str]], labels: Sequence, class_names: list[str] | None = None) -> TrainingImages:
    """Class-labelled images -> TrainingImages: each image of a class with ≥ 2 members is a query,
    its positives the other members of the class."""
    paths = [Path(p) for p in paths]
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} images but {len(labels)} labels")
    if class_names is None:
        class_names, clusters = np.unique(np.asarray([str(x) for x in labels]), return_inverse=True)
        class_names = [str(c) for c in class_names]
    else:
        clusters = np.asarray(labels, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64).reshape(-1)
    queries, positives = [], []
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        if len(members) < 2:
            continue
        for i in members:
            queries.append(i)
            positives.append(members[members != i])
    return TrainingImages(paths, clusters, np.asarray(queries, dtype=np.int64), positives, class_names)


def _sfm_path(root: Path, cid: str, layout: str, ext: str) -> Path:
    if layout == "cid":
        return root / cid[-2:] / cid[-4:-2] / cid[-6:-4] / (cid + ext)
    if layout == "flat":
        return root / (cid + ext)
    raise ValueError(f"unknown SfM image layout {layout!r}; choose 'cid' or 'flat'")


def load_sfm(
    pkl: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    split: str = "train",
    layout: str = "cid",
    ext: str = "",
) -> TrainingImages:
    """Read a retrieval-SfM-120k style db ``.pkl`` (``{split: {cids, cluster, qidxs, pidxs}}``), and
    the evidence lists ``pinliers`` / ``p3d`` when present (both or neither; non-negative integers,
    one per (qidxs, pidxs) entry; a pair listed twice keeps its largest values)."""
    pkl = Path(pkl)
    if not pkl.is_file():
        raise FileNotFoundError(f"SfM training db not found: {pkl}")
    db = load_plain_pickle(pkl, "SfM training db (.pkl)")
    if not isinstance(db, dict) or split not in db:
        raise FormatError(f"{pkl}: no split {split!r} (has {sorted(map(str, db)) if isinstance(db, dict) else type(db).__name__})")
    d = db[split]
    if not isinstance(d, dict):
        raise FormatError(f"{pkl}[{split!r}] is not a dict of cids, cluster, qidxs, pidxs")
    missing = [k for k in ("cids", "cluster", "qidxs", "pidxs") if k not in d]
    if missing:
        raise FormatError(f"{pkl}[{split!r}] lacks {missing} (retrieval-SfM-120k format needs cids, cluster, qidxs, pidxs)")
    if len(d["qidxs"]) != len(d["pidxs"]) or len(d["cids"]) != len(d["cluster"]):
        raise FormatError(f"{pkl}[{split!r}]: qidxs/pidxs or cids/cluster lengths differ")
    n = len(d["cids"])
    try:
        q_all = np.asarray(d["qidxs"], dtype=np.int64).reshape(-1)
        p_all = np.asarray(d["pidxs"], dtype=np.int64).reshape(-1)
        clusters = np.asarray(d["cluster"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{pkl}[{split!r}]: qidxs, pidxs and cluster must be integers ({exc})") from None
    if len(q_all) and (min(q_all.min(), p_all.min()) < 0 or max(q_all.max(), p_all.max()) >= n):
        raise FormatError(f"{pkl}[{split!r}]: qidxs/pidxs outside the {n} images")
    has = [k for k in ("pinliers", "p3d") if k in d]
    evidence_all = None
    if has:
        if len(has) != 2:
            raise FormatError(f"{pkl}[{split!r}]: has {has[0]} without {'p3d' if has[0] == 'pinliers' else 'pinliers'}")
        try:
            evidence_all = np.stack([np.asarray(d["pinliers"], dtype=np.int64).reshape(-1),
                                     np.asarray(d["p3d"], dtype=np.int64).reshape(-1)], axis=1)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"{pkl}[{split!r}]: pinliers and p3d must be integer lists as long as qidxs ({exc})") from None
        if evidence_all.shape != (len(q_all), 2) or (evidence_all < 0).any():
            raise FormatError(f"{pkl}[{split!r}]: pinliers and p3d must be non-negative integers, one per qidxs entry")
    root = Path(image_root)
    paths = [_sfm_path(root, str(c), layout, ext) for c in d["cids"]]
    by_query: dict[int, dict[int, np.ndarray]] = {}
    for t, (q, p) in enumerate(zip(q_all.tolist(), p_all.tolist())):
        ev = evidence_all[t] if evidence_all is not None else np.zeros(2, dtype=np.int64)
        seen = by_query.setdefault(q, {})
        seen[p] = np.maximum(seen[p], ev) if p in seen else ev
    queries = np.asarray(list(by_query), dtype=np.int64)
    positives = [np.asarray(sorted(v), dtype=np.int64) for v in by_query.values()]
    evidence = None
    if evidence_all is not None:
        evidence = [np.asarray([v[p] for p in sorted(v)], dtype=np.int64).reshape(-1, 2) for v in by_query.values()]
    return TrainingImages(paths, clusters, queries, positives, evidence=evidence)


def load_class_folder(root: str | os.PathLike[str]) -> TrainingImages:
    """A folder per class: ``ROOT/<class>/<image>``, the photos of :func:`cbir.collection.class_photos`
    (image extensions: :data:`IMAGE_EXTENSIONS`; hidden files and folders left out)."""
    from ..collection import class_photos

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training image folder not found: {root}")
    paths, labels = class_photos(root)
    if not paths:
        raise ValueError(f"{root}: no images in class sub-folders (expected ROOT/<class>/<image>)")
    return from_labels(paths, labels)


def _gldv2_path(root: Path, image_id: str) -> Path:
    return root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def load_class_csv(csv_path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None) -> TrainingImages:
    """A CSV of image and label (see the module docstring for the accepted column names)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"training CSV not found: {csv_path}")
    root = Path(image_root) if image_root is not None else csv_path.parent
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        img_col = next((f for f in ("image", "path", "filename", "id") if f in fields), None)
        lab_col = next((f for f in ("label", "class", "landmark_id", "landmark") if f in fields), None)
        if img_col is None or lab_col is None:
            raise FormatError(f"{csv_path}: need a header with an image column (image/path/filename/id) and a "
                              f"label column (label/class/landmark_id); got {reader.fieldnames}")
        names = {f.strip().lower(): f for f in reader.fieldnames or []}
        paths, labels = [], []
        for row in reader:
            img = (row[names[img_col]] or "").strip()
            lab = (row[names[lab_col]] or "").strip()
            if not img or not lab:
                continue
            if img_col == "id" and not Path(img).suffix:
                paths.append(_gldv2_path(root, img))
            else:
                paths.append(root / img)
            labels.append(lab)
    if not paths:
        raise ValueError(f"{csv_path}: no rows with both an image and a label")
    return from_labels(paths, labels)


def load_training_images(cfg: dict) -> TrainingImages:
    """From the ``data`` section of a training config: ``kind`` = sfm | folder | csv."""
    kind = cfg.get("kind", "folder")
    if kind == "sfm":
        return load_sfm(cfg["pkl"], cfg["root"], cfg.get("split", "train"), cfg.get("layout", "cid"), cfg.get("ext", ""))
    if kind == "folder":
        return load_class_folder(cfg["root"])
    if kind == "csv":
        return load_class_csv(cfg["csv"], cfg.get("root"))
    raise ValueError(f"unknown data kind {kind!r}; choose sfm, folder or csv")


def split_classes(data: TrainingImages, fraction: float, rng: np.random.Generator) -> tuple[TrainingImages, TrainingImages]:
    """Hold out ``fraction`` of the clusters that have at least two images (at least two such
    clusters): (training part, held-out part). No image of a held-out cluster is in the training part."""
    ids, counts = np.unique(data.clusters, return_counts=True)
    multi = ids[counts >= 2]
    n = max(2, int(round(fraction * len(multi))))
    if len(multi) - n < 2:
        raise ValueError(f"validation.split={fraction}: {len(multi)} classes with two or more images are too few to "
                         f"hold out {n} and train on the rest (need at least {n + 2})")
    held = np.sort(rng.choice(multi, size=n, replace=False))
    mask = np.isin(data.clusters, held)
    return data.subset(np.flatnonzero(~mask)), data.subset(np.flatnonzero(mask))


def split_images(data: TrainingImages, fraction: float, rng: np.random.Generator) -> tuple[TrainingImages, TrainingImages]:
    """Hold out ``fraction`` of the images of every cluster with at least four images (at least two
    per such cluster, and two left to train on): (training part, held-out part). For data with few
    classes (landmarks), where holding out whole classes would leave too few to train on."""
    held: list[int] = []
    for c in np.unique(data.clusters):
        members = np.flatnonzero(data.clusters == c)
        if len(members) < 4:
            continue
        n = min(max(2, int(round(fraction * len(members)))), len(members) - 2)
        held.extend(rng.choice(members, size=n, replace=False).tolist())
    if not held:
        raise ValueError(f"validation.split={fraction} (by images): no class has the four images needed to hold "
                         "two out; set validation=null to train without validation")
    mask = np.zeros(len(data.paths), dtype=bool)
    mask[held] = True
    return data.subset(np.flatnonzero(~mask)), data.subset(np.flatnonzero(mask))


@dataclass
class HeldOut:
    """A validation split: the training part, the held-out part, how it was split ("classes" or
    "images") and, when that differs from what was asked, why (one sentence)."""

    train: TrainingImages
    held: TrainingImages
    split_by: str
    note: str | None = None


def split_for_validation(data: TrainingImages, fraction: float, split_by: str, rng: np.random.Generator) -> HeldOut:
    """Hold out ``fraction`` of ``data`` for validation: whole classes (``split_by="classes"``,
    :func:`split_classes`) or part of each class's images (``"images"``, :func:`split_images`).

    With too few classes to hold whole ones out (fewer than 2 to hold out + 2 to train on, among the
    classes of two or more images) it splits by images instead and says so in ``note``; ValueError
    (naming ``validation.split``) when neither is possible."""
    if split_by not in ("classes", "images"):
        raise ValueError(f"validation.split_by must be classes or images, got {split_by!r}")
    note = None
    if split_by == "classes":
        ids, counts = np.unique(data.clusters, return_counts=True)
        multi = int((counts >= 2).sum())
        n = max(2, int(round(fraction * multi)))
        if multi - n >= 2:
            train_part, held = split_classes(data, fraction, rng)
            return HeldOut(train_part, held, "classes")
        note = (f"validation.split={fraction}: {multi} classes with two or more photos are too few to hold whole "
                f"classes out (need at least {n + 2}); holding out {fraction:.0%} of each class's photos instead "
                "(split by images)")
    train_part, held = split_images(data, fraction, rng)
    return HeldOut(train_part, held, "images", note)


def clean_classes(data: TrainingImages, vectors: np.ndarray, k: float = 3.0, min_size: int = 4,
                  nearest_class: bool = True) -> tuple[TrainingImages, np.ndarray]:
    """Drop images inconsistent with their class (:func:`~cbir.training.mining.class_consistency_mask`)
    and rebuild queries/positives. vectors: (N, D) descriptors of ``data.paths``. Returns the
    cleaned data and the keep-mask."""
    keep = class_consistency_mask(vectors, data.clusters, k=k, min_size=min_size, nearest_class=nearest_class)
    idx = np.flatnonzero(keep)
    cleaned = from_labels([data.paths[i] for i in idx], data.clusters[idx].tolist(), class_names=data.class_names)
    return cleaned, keep


def clean_by_verification(data: TrainingImages, vectors: np.ndarray, store: str | os.PathLike[str], settings=None, *,
                          progress: Callable[[str, int, int], None] | None = None, workers: int = 1,
                          device: str = "auto"):
    """Drop images that verify with none of their nearest class-mates
    (:func:`cbir.sfm.clean.clean_by_verification`: SIFT + RANSAC, features kept in ``store``) and
    rebuild queries/positives. Returns (cleaned data, keep-mask, :class:`cbir.sfm.clean.CleanReport`)."""
    from ..sfm.clean import clean_by_verification as verify_clean

    names = data.class_names
    labels = [names[c] if names is not None and 0 <= c < len(names) else str(c) for c in data.clusters.tolist()]
    report = verify_clean(data.paths, labels, vectors, store, settings, progress=progress, workers=workers,
                          device=device)
    idx = np.flatnonzero(report.keep)
    cleaned = from_labels([data.paths[i] for i in idx], data.clusters[idx].tolist(), class_names=data.class_names)
    return cleaned, report.keep, report


#: How :func:`build_epoch_tuples` picks a query's positive (``mining.positive``).
POSITIVE_RULES = ("random", "inliers_top1", "inliers_topk")


def build_epoch_tuples(
    data: TrainingImages,
    embed: Callable[[np.ndarray], np.ndarray],
    *,
    n_queries: int,
    pool_size: int,
    n_negatives: int,
    hard_positives: bool = False,
    positive: str = "random",
    positive_k: int = 5,
    rng: np.random.Generator,
) -> np.ndarray:
    """Tuples (T, 2 + k) of image indices: query, positive, k diverse hard negatives.

    ``embed(indices) -> (len, D)`` describes images with the current model. ``n_queries`` queries
    are drawn without replacement (all when fewer); the negative pool is ``pool_size`` random
    images. Positive (``positive``): ``"random"``, a random candidate, or with ``hard_positives``
    the candidate least similar to the query (:func:`hardest_positive`); for data with evidence
    (mined tuples) ``"inliers_top1"``, the candidate with the most inliers, or ``"inliers_topk"``,
    a random one of the ``positive_k`` with the most (:func:`positive_by_evidence`).
    Negatives: :func:`mine_diverse_negatives`; when the pool lacks enough other clusters, the rest
    are random images of unused other clusters. k is capped at the number of clusters minus one.
    """
    if positive not in POSITIVE_RULES:
        raise ValueError(f"mining.positive must be one of {', '.join(POSITIVE_RULES)}, got {positive!r}")
    if positive != "random" and data.evidence is None:
        raise ValueError(f"mining.positive={positive} needs inlier counts in the training data (a tuple file "
                         "written by `cbir mine`); this data has none (use positive: random)")
    if positive != "random" and hard_positives:
        raise ValueError(f"mining.positive={positive} and mining.hard_positives=true choose the positive two ways; "
                         "set one")
    nq = min(n_queries, len(data.queries))
    qsel = rng.choice(len(data.queries), size=nq, replace=False)
    qidx = data.queries[qsel]
    k = min(n_negatives, data.n_clusters - 1)
    pool = rng.choice(len(data.paths), size=min(pool_size, len(data.paths)), replace=False)
    need = np.unique(np.concatenate([qidx, pool] + ([np.concatenate([data.positives[s] for s in qsel])] if hard_positives else [])))
    vecs = embed(need)
    row = {int(i): r for r, i in enumerate(need)}
    qv = vecs[[row[int(i)] for i in qidx]]
    pv = vecs[[row[int(i)] for i in pool]]
    negs = mine_diverse_negatives(qv, pv, data.clusters[qidx], data.clusters[pool], k)
    negs = np.where(negs >= 0, pool[np.maximum(negs, 0)], -1)
    out = np.empty((nq, 2 + k), dtype=np.int64)
    for t, (s, q) in enumerate(zip(qsel, qidx)):
        cands = data.positives[s]
        if positive != "random":
            p = cands[positive_by_evidence(data.evidence[s], 1 if positive == "inliers_top1" else positive_k, rng)]
        elif hard_positives:
            p = cands[hardest_positive(qv[t], vecs[[row[int(i)] for i in cands]])]
        else:
            p = cands[rng.integers(len(cands))]
        row_negs = negs[t]
        if (row_negs < 0).any():
            used = {int(data.clusters[q])} | {int(data.clusters[j]) for j in row_negs if j >= 0}
            for slot in np.flatnonzero(row_negs < 0):
                others = np.flatnonzero(~np.isin(data.clusters, list(used)))
                j = int(others[rng.integers(len(others))])
                row_negs[slot] = j
                used.add(int(data.clusters[j]))
        out[t] = [q, p, *row_negs]
    return out


def square_tensor(im, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> (3, size, size) float32: resized to a square (aspect not kept, so tuples batch),
    normalised (x − mean)/std."""
    from PIL import Image

    im = im.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def _augment(im, rng: np.random.Generator):
    """Light training augmentation: random crop of 60–100 % of the area, brightness/contrast ±20 %."""
    from PIL import ImageEnhance

    w, h = im.size
    area = rng.uniform(0.6, 1.0)
    cw, ch = max(1, int(w * np.sqrt(area))), max(1, int(h * np.sqrt(area)))
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    im = im.crop((int(x0), int(y0), int(x0 + cw), int(y0 + ch)))
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))


class ImageDataset(torch.utils.data.Dataset):
    """Images by index, as square tensors: item -> (index, (3, S, S))."""

    def __init__(self, paths: Sequence[Path], indices: Sequence[int], size: int, mean, std) -> None:
        self.paths, self.indices, self.size, self.mean, self.std = paths, list(indices), size, mean, std

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from ..extract import load_image

        j = self.indices[i]
        return j, square_tensor(load_image(self.paths[j]), self.size, self.mean, self.std)


class TupleDataset(torch.utils.data.Dataset):
    """Tuples of images: item -> ((2 + k, 3, S, S) query, positive, negatives; (2 + k,) cluster ids)."""

    def __init__(self, data: TrainingImages, tuples: np.ndarray, size: int, mean, std, augment: bool = False, seed: int = 0) -> None:
        self.data, self.tuples, self.size, self.mean, self.std = data, np.asarray(tuples), size, mean, std
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitem__(self, i: int):
        from ..extract import load_image

        rng = np.random.default_rng([self.seed, i])
        ims = []
        for j in self.tuples[i]:
            im = load_image(self.data.paths[j])
            if self.augment:
                im = _augment(im, rng)
            ims.append(square_tensor(im, self.size, self.mean, self.std))
        return torch.stack(ims), torch.as_tensor(self.data.clusters[self.tuples[i]])
