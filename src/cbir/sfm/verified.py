"""Verified pairs of a photo collection, with no label: the first half of mining, as a library call.

    vp = verified_pairs(paths, PairSettings(), work_dir)      # -> VerifiedPairs
    vp.pairs[vp.verified], vp.inliers[vp.verified], vp.clusters

The steps (Radenović et al., TPAMI'18, "Fine-tuning CNN image retrieval with no human annotation"):

1. ``describe``: one global descriptor per photo (:class:`PairSettings` model, default Lite0 + GeM)
   through the extraction cache (:mod:`cbir.cache.describe`: a photo already described with that
   model and those settings is read, not described again), in chunks of :data:`DESCRIBE_CHUNK`;
2. ``pairs``: each photo's k nearest neighbours, deduplicated (:func:`cbir.sfm.pairs.knn_pairs`);
3. ``features``: SIFT of every photo into a :class:`cbir.local.store.LocalFeatureStore`;
4. ``verify``: matching + RANSAC of every candidate pair (:func:`cbir.local.verify.verify_candidates`,
   seeded: the same pair always gets the same inliers), in chunks of :data:`VERIFY_CHUNK` pairs; the
   inlier correspondences of each verified pair (n >= ``min_inliers``) are kept for SfM;
5. ``graph``: clusters = connected components of the verified graph, weak bridges cut
   (:func:`cbir.sfm.graph.cluster_graph`).

Everything is written into ``work_dir`` atomically, each step's output once complete (the feature
store and the verification every chunk), so a killed run continues where it stopped and ends with
the same result as an uninterrupted one. The folder is stamped with the settings and the photo list
(:class:`cbir.sfm.state.WorkDir`): other settings -> one-line refusal, or ``restart=True``.

Layout: ``state.json``, ``times.json``, ``global.npz`` (N x D vectors, ok flags), ``candidates.npz``,
``local/`` (the feature store), ``verify/<chunk>.npz`` (inlier counts, correspondences),
``graph.npz`` (inliers of every pair, cluster of every photo, the cut bridges).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..fileio import FormatError, load_stamped_npz, save_stamped_npz
from .settings import PairSettings
from .state import WorkDir

__all__ = ["VerifiedPairs", "verified_pairs", "Progress", "DESCRIBE_CHUNK", "VERIFY_CHUNK"]

#: ``progress(stage, done, total)``: ``done`` more units of ``stage`` (of ``total``) are finished.
Progress = Callable[[str, int, int], None]
#: Photos described per call of the extraction cache (the resume step of ``describe``).
DESCRIBE_CHUNK = 64
#: Candidate pairs verified per chunk file (the resume step of ``verify``).
VERIFY_CHUNK = 256
#: Photos per shard of the local feature store (the resume step of ``features``).
FEATURE_SHARD = 64

_GLOBAL, _CANDS, _CHUNK, _GRAPH = "cbir-mine-global", "cbir-mine-candidates", "cbir-mine-verify", "cbir-mine-graph"
_VERSION = 1


@dataclass
class VerifiedPairs:
    """The verified-pair graph of a collection.

    ``keys`` (N names) and ``paths``; ``ok`` (N,) bool: described and given local features (the
    others are in ``failed``, key -> reason, and in no pair); ``vectors`` (N, D) float32 global
    descriptors (zero rows where not described); ``pairs`` (P, 2) int64 candidate pairs i < j,
    sorted; ``similarity`` (P,) their global similarity; ``inliers`` (P,) int64 RANSAC inlier
    counts; ``clusters`` (N,) int64 cluster of each photo (-1: in no verified pair); ``cut``
    indices into ``pairs`` of the verified pairs cut as weak bridges; ``store``: the local
    feature store folder; ``times``: seconds per stage over every run.
    """

    keys: list[str]
    paths: list[Path]
    ok: np.ndarray
    vectors: np.ndarray
    pairs: np.ndarray
    similarity: np.ndarray
    inliers: np.ndarray
    clusters: np.ndarray
    cut: np.ndarray
    settings: PairSettings
    work_dir: Path
    failed: dict[str, str] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)

    @property
    def min_inliers(self) -> int:
        return int(self.settings.min_inliers)

    @property
    def verified(self) -> np.ndarray:
        """Indices into ``pairs`` of the verified pairs (inliers >= min_inliers), cut bridges included."""
        return np.flatnonzero(self.inliers >= self.min_inliers)

    @property
    def store(self) -> Path:
        return self.work_dir / "local"

    @property
    def n_clusters(self) -> int:
        return int(self.clusters.max()) + 1 if len(self.clusters) and self.clusters.max() >= 0 else 0

    def matches(self, p: int) -> np.ndarray:
        """Inlier correspondences (K, 2) int64 (keypoint rows of pairs[p, 0], pairs[p, 1]) of verified pair
        ``p``; empty for an unverified pair."""
        arrays = _read_chunk(self.work_dir, p // VERIFY_CHUNK)
        r = p % VERIFY_CHUNK
        lo, hi = int(arrays["offsets"][r]), int(arrays["offsets"][r + 1])
        return arrays["matches"][lo:hi].astype(np.int64)

    def matches_many(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """{p: matches(p)} reading each chunk file once."""
        out: dict[int, np.ndarray] = {}
        by_chunk: dict[int, list[int]] = {}
        for p in indices:
            by_chunk.setdefault(int(p) // VERIFY_CHUNK, []).append(int(p))
        for c, ps in by_chunk.items():
            arrays = _read_chunk(self.work_dir, c)
            for p in ps:
                r = p % VERIFY_CHUNK
                lo, hi = int(arrays["offsets"][r]), int(arrays["offsets"][r + 1])
                out[p] = arrays["matches"][lo:hi].astype(np.int64)
        return out


def _chunk_path(work_dir: Path, c: int) -> Path:
    return work_dir / "verify" / f"{c:06d}.npz"


def _read_chunk(work_dir: Path, c: int) -> dict[str, np.ndarray]:
    path = _chunk_path(work_dir, c)
    arrays, meta = load_stamped_npz(path, _CHUNK, (_VERSION,), "mined verification chunk")
    if meta.get("first") != c * VERIFY_CHUNK or not isinstance(meta.get("stop"), int) \
            or meta["stop"] - meta["first"] != len(arrays.get("inliers", ())):
        raise FormatError(f"{path}: chunk {c} does not hold pairs from {c * VERIFY_CHUNK} "
                          "(written with another chunk size?)")
    inl, off, m = arrays.get("inliers"), arrays.get("offsets"), arrays.get("matches")
    if (inl is None or off is None or m is None or inl.ndim != 1 or off.shape != (len(inl) + 1,)
            or m.ndim != 2 or m.shape[1] != 2 or int(off[-1]) != len(m) or (np.diff(off) < 0).any()):
        raise FormatError(f"{path}: inconsistent verification chunk (inliers, offsets, matches)")
    return arrays


def _inputs_doc(keys: Sequence[str], paths: Sequence[Path]) -> list[Any]:
    """What identifies the photos: the key, size and modification time of each (not the path: the
    same folder named another way, e.g. relative then absolute, is the same input)."""
    out: list[Any] = []
    for k, p in zip(keys, paths):
        try:
            st = os.stat(p)
            out.append([k, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([k, None, None])
    return out


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, int(done), int(total))


def verified_pairs(
    paths: Sequence[str | os.PathLike[str]],
    settings: PairSettings | None,
    work_dir: str | os.PathLike[str],
    *,
    keys: Sequence[str] | None = None,
    progress: Progress | None = None,
    device: str = "auto",
    workers: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
) -> VerifiedPairs:
    """Describe, pair, extract, verify and cluster ``paths`` in ``work_dir`` (module docstring).

    ``keys``: a unique name per photo (default: the path as given); ``settings``: None = the
    defaults; ``progress(stage, done, total)`` for bars; ``device`` for the global model and the
    matching ("auto", "cpu", "cuda"); ``workers``: SIFT processes; ``cache_dir``: the extraction
    cache (default :func:`cbir.paths.cache_dir`, ``$CBIR_CACHE`` or ``$XDG_CACHE_HOME/cbir/descriptors``). A work folder holding a run with other
    settings or photos: :class:`cbir.sfm.state.SettingsChanged` unless ``restart``.
    """
    settings = settings or PairSettings()
    paths = [Path(p) for p in paths]
    keys = [str(p) for p in paths] if keys is None else [str(k) for k in keys]
    if len(keys) != len(paths):
        raise ValueError(f"{len(keys)} keys for {len(paths)} photos")
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise ValueError(f"photo name {k!r} is given twice")
        seen.add(k)
    if not keys:
        raise ValueError("no photos to mine")
    wd = WorkDir(work_dir, "verified pairs", settings.to_dict(), _inputs_doc(keys, paths), restart=restart)
    root = wd.path
    vectors, described, failed = _describe(wd, paths, keys, settings, progress, device, cache_dir)
    pairs, sims = _candidates(wd, vectors, described, settings, progress)
    store, failed_local = _features(wd, paths, keys, described, settings, progress, workers)
    failed.update(failed_local)
    ok = described & np.asarray([k in store for k in keys], dtype=bool)
    inliers = _verify(wd, store, keys, ok, pairs, settings, progress, device)
    clusters, cut = _graph(wd, len(keys), pairs, inliers, settings, progress)
    return VerifiedPairs(keys=keys, paths=paths, ok=ok, vectors=vectors, pairs=pairs, similarity=sims,
                         inliers=inliers, clusters=clusters, cut=cut, settings=settings, work_dir=root,
                         failed=failed, times=wd.times())


# ---------------------------------------------------------------------------------------------
# the steps


def _describe(wd: WorkDir, paths: list[Path], keys: list[str], settings: PairSettings, progress: Progress | None,
              device: str, cache_dir: Any) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(vectors (N, D), described (N,) bool, failed {key: reason})."""
    out = wd.path / "global.npz"
    n = len(paths)
    if out.is_file():
        arrays, meta = load_stamped_npz(out, _GLOBAL, (_VERSION,), "mined global descriptors")
        vec, ok = arrays.get("vectors"), arrays.get("ok")
        if vec is None or ok is None or vec.ndim != 2 or vec.shape[0] != n or ok.shape != (n,) \
                or not np.isfinite(vec).all():
            raise FormatError(f"{out}: global descriptors do not match the {n} photos")
        _report(progress, "describe", n, n)
        return vec.astype(np.float32), ok.astype(bool), {str(k): str(v) for k, v in meta.get("failed", {}).items()}
    from ..cache.describe import CacheStats, DescriptorCache, LazyNet, extract_with_cache
    from ..cache.identity import cacheable_pooling
    from ..model import ModelSpec

    spec = ModelSpec(settings.model, settings.pooling, settings.weights)
    if not cacheable_pooling(spec.pooling):
        raise ValueError(f"pooling {spec.pooling!r} depends on the images it is fitted on; mining needs a fixed "
                         "global descriptor (e.g. gem)")
    imsize, scales = settings.resolution()
    cache = DescriptorCache.for_spec(spec, imsize=imsize, scales=scales, device=device, root=cache_dir)
    lazy = LazyNet(spec.build)
    rows: dict[int, np.ndarray] = {}
    failed: dict[str, str] = {}
    described = 0
    with wd.timed("describe"):
        try:
            for start in range(0, n, DESCRIBE_CHUNK):
                chunk = list(range(start, min(n, start + DESCRIBE_CHUNK)))
                stats = CacheStats()
                res = extract_with_cache(lazy, [paths[i] for i in chunk], cache=cache, stats=stats, imsize=imsize,
                                         scales=scales, device=device, progress=False, strict=False)
                described += stats.described
                for r, j in enumerate(res.ok.tolist()):
                    rows[chunk[j]] = res.vectors[r]
                reasons = iter(res.failed)  # in input order, one per input left out of ok
                for i in chunk:
                    if i not in rows:
                        failed[keys[i]] = str(next(reasons, {}).get("reason", "unreadable"))
                _report(progress, "describe", len(chunk), n)
        finally:
            cache.close()
    if not rows:
        raise ValueError(f"none of the {n} photos could be read ({next(iter(failed.values()), 'no image')})")
    dim = next(iter(rows.values())).shape[0]
    vec = np.zeros((n, dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    for i, v in rows.items():
        vec[i], ok[i] = v, True
    about = lazy.net.describe() if lazy.net is not None else cache.store.about
    save_stamped_npz(out, {"vectors": vec, "ok": ok},
                     {"failed": failed, "imsize": imsize, "scales": list(scales), "model": about or {},
                      "described": described}, _GLOBAL, _VERSION)
    return vec, ok, failed


def _candidates(wd: WorkDir, vectors: np.ndarray, ok: np.ndarray, settings: PairSettings,
                progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    from .pairs import knn_pairs

    out = wd.path / "candidates.npz"
    if out.is_file():
        arrays, _ = load_stamped_npz(out, _CANDS, (_VERSION,), "mined candidate pairs")
        pairs, sims = arrays.get("pairs"), arrays.get("similarity")
        n = len(vectors)
        if pairs is None or sims is None or pairs.ndim != 2 or pairs.shape[1] != 2 or sims.shape != (len(pairs),) \
                or (len(pairs) and (pairs.min() < 0 or pairs.max() >= n or (pairs[:, 0] >= pairs[:, 1]).any())):
            raise FormatError(f"{out}: candidate pairs are not (P, 2) pairs i < j of the {n} photos")
        _report(progress, "pairs", 1, 1)
        return pairs.astype(np.int64), sims.astype(np.float32)
    with wd.timed("pairs"):
        pairs, sims = knn_pairs(vectors, settings.k, valid=ok)
    save_stamped_npz(out, {"pairs": pairs, "similarity": sims}, {"k": settings.k}, _CANDS, _VERSION)
    _report(progress, "pairs", 1, 1)
    return pairs, sims


def _features(wd: WorkDir, paths: list[Path], keys: list[str], ok: np.ndarray, settings: PairSettings,
              progress: Progress | None, workers: int):
    from ..local.store import LocalFeatureStore, extract_to_store

    store = LocalFeatureStore(wd.path / "local", settings.local)
    idx = np.flatnonzero(ok)
    total = len(idx)
    with wd.timed("features"):
        extract_to_store([paths[i] for i in idx], [keys[i] for i in idx], None, store,
                         progress=(lambda k: _report(progress, "features", k, total)), workers=workers,
                         shard_size=FEATURE_SHARD, device="cpu")
    names = set(keys)
    failed = {k: v for k, v in store.failed.items() if k in names}
    return store, failed


def _verify(wd: WorkDir, store: Any, keys: list[str], ok: np.ndarray, pairs: np.ndarray, settings: PairSettings,
            progress: Progress | None, device: str) -> np.ndarray:
    from ..local.verify import verify_candidates

    (wd.path / "verify").mkdir(exist_ok=True)
    total = len(pairs)
    n_chunks = (total + VERIFY_CHUNK - 1) // VERIFY_CHUNK
    inliers = np.zeros(total, dtype=np.int64)
    for c in range(n_chunks):
        lo, hi = c * VERIFY_CHUNK, min(total, (c + 1) * VERIFY_CHUNK)
        path = _chunk_path(wd.path, c)
        if path.is_file():
            arrays = _read_chunk(wd.path, c)
            if len(arrays["inliers"]) != hi - lo:
                raise FormatError(f"{path}: {len(arrays['inliers'])} pairs, expected {hi - lo}")
            inliers[lo:hi] = arrays["inliers"]
            _report(progress, "verify", hi - lo, total)
            continue
        with wd.timed("verify"):
            counts = np.zeros(hi - lo, dtype=np.int64)
            found: dict[int, np.ndarray] = {}
            groups: dict[int, list[int]] = {}
            for p in range(lo, hi):
                a, b = int(pairs[p, 0]), int(pairs[p, 1])
                if ok[a] and ok[b]:
                    groups.setdefault(a, []).append(p)
            for a, ps in groups.items():
                res, details = verify_candidates(store.get(keys[a]), [keys[int(pairs[p, 1])] for p in ps],
                                                 settings.verify, store=store, details=True, device=device)
                for p, n_in, v in zip(ps, res, details):
                    counts[p - lo] = int(n_in)
                    if n_in >= settings.min_inliers:
                        found[p - lo] = v.matches
                _report(progress, "verify", len(ps), total)
            _report(progress, "verify", (hi - lo) - sum(len(ps) for ps in groups.values()), total)
            offsets = np.zeros(hi - lo + 1, dtype=np.int64)
            parts = []
            for r in range(hi - lo):
                m = found.get(r)
                offsets[r + 1] = offsets[r] + (0 if m is None else len(m))
                if m is not None:
                    parts.append(np.asarray(m, dtype=np.uint32).reshape(-1, 2))
            matches = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.uint32)
            save_stamped_npz(path, {"inliers": counts, "offsets": offsets, "matches": matches},
                             {"first": lo, "stop": hi}, _CHUNK, _VERSION)
            inliers[lo:hi] = counts
    return inliers


def _graph(wd: WorkDir, n: int, pairs: np.ndarray, inliers: np.ndarray, settings: PairSettings,
           progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    from .graph import cluster_graph

    out = wd.path / "graph.npz"
    if out.is_file():
        arrays, _ = load_stamped_npz(out, _GRAPH, (_VERSION,), "mined cluster graph")
        labels, cut = arrays.get("clusters"), arrays.get("cut")
        if labels is None or cut is None or labels.shape != (n,) or cut.ndim != 1 \
                or (len(cut) and (cut.min() < 0 or cut.max() >= len(pairs))):
            raise FormatError(f"{out}: clusters do not match the {n} photos and {len(pairs)} pairs")
        _report(progress, "graph", 1, 1)
        return labels.astype(np.int64), cut.astype(np.int64)
    with wd.timed("graph"):
        labels, cut = cluster_graph(n, pairs, inliers, settings.min_inliers, settings.bridge_inliers)
    save_stamped_npz(out, {"clusters": labels, "cut": cut, "inliers": inliers}, {}, _GRAPH, _VERSION)
    _report(progress, "graph", 1, 1)
    return labels, cut
