"""Benchmark -> (query, database) Descriptors: described with a model (through the cache), looked up
in saved descriptors, or several poolings on one backbone pass."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..descriptors import Descriptors
from .benchmark import Benchmark, extraction_defaults


def describe(
    bench: Benchmark,
    model: Any,
    *,
    imsize: int | None = None,
    scales: Sequence[float] | None = None,
    crop: bool = True,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    backend: str = "auto",
    progress: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Descriptors, Descriptors]:
    """(queries, database) descriptors of ``bench`` with ``model``.

    ``model``: a :class:`cbir.model.ModelSpec` (hashable settings: cached under ``cache_dir``), a
    backbone name or model file (read as ``ModelSpec(model)``), or an in-memory
    :class:`cbir.model.RetrievalNet` (never cached). Queries are cropped to their box unless
    ``crop=False``. ``imsize``/``scales`` default to :func:`extraction_defaults`. Database photos
    and queries are described in one pass through :func:`cbir.cache.describe.extract_with_cache`:
    each (image contents, crop box) runs through the network at most once (a whole-image query
    that is also a database photo once for both), and not at all when ``cache_dir`` holds it.
    A BoW pooling without a codebook is fitted on the database images first (seeded; its
    descriptors are not cached). Every image must be readable (ImageError otherwise). ``meta`` of
    both holds the settings, ``cache`` ("hit": nothing described, "miss", or None without a cache)
    and ``described`` / ``cache_hits`` (image counts).
    """
    from ..cache.describe import CacheStats, DescriptorCache, LazyNet, extract_with_cache
    from ..cache.identity import cacheable_pooling
    from ..model import ModelSpec

    if isinstance(model, (str, os.PathLike)):
        model = ModelSpec(str(model))
    if isinstance(model, ModelSpec):
        d_imsize, d_scales = extraction_defaults(bench, model.model)
    else:  # an in-memory RetrievalNet: the defaults of its backbone
        config = getattr(model, "config", None) or {}
        d_imsize, d_scales = extraction_defaults(bench, config.get("model", ""), config)
    imsize = d_imsize if imsize is None else int(imsize)
    scales = tuple(float(s) for s in (d_scales if scales is None else scales))
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales}")
    missing = next((p for p in list(bench.db_paths[:1]) + list(bench.query_paths[:1]) if not Path(p).is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"image not found: {missing} (give the image folder, or `cbir download {bench.name}`)")
    spec = model if isinstance(model, ModelSpec) else None
    cache = None
    if cache_dir is not None and spec is not None and cacheable_pooling(spec.pooling):
        cache = DescriptorCache.for_spec(spec, imsize=imsize, scales=scales, device=device, precision=precision,
                                         backend=backend, root=cache_dir)
    lazy = LazyNet(spec.build) if spec is not None else LazyNet(lambda: model)
    if spec is None or not cacheable_pooling(spec.pooling):
        net = lazy()
        if getattr(net.pooling, "name", "") == "bow" and not bool(net.pooling.fitted):
            from ..extract import fit_bow

            fit_bow(net, bench.db_paths, imsize=imsize, device=device)
    n_db = len(bench.db_paths)
    boxes = list(bench.query_bboxes) if crop else [None] * len(bench.query_paths)
    stats = CacheStats()
    t0 = time.perf_counter()
    try:
        res = extract_with_cache(lazy, list(bench.db_paths) + list(bench.query_paths), cache=cache,
                                 bboxes=[None] * n_db + boxes, stats=stats, imsize=imsize, scales=scales,
                                 device=device, batch_size=batch_size, progress=progress, strict=True,
                                 precision=precision, backend=backend)
        about = lazy.net.describe() if lazy.net is not None else (cache.store.about if cache is not None else None)
    finally:
        if cache is not None:
            cache.close()
    if about is None:  # a store written by hand or emptied of its description: ask the network
        about = lazy().describe()
    meta = {**about, "imsize": imsize, "scales": list(scales),
            "cropped_queries": bool(crop) and any(b is not None for b in bench.query_bboxes),
            "precision": precision, "extract_seconds": round(time.perf_counter() - t0, 2),
            "images": len(bench.db_paths) + len(bench.query_paths), "benchmark": bench.name,
            "cache": None if cache is None else ("hit" if stats.described == 0 else "miss"),
            "described": stats.described, "cache_hits": stats.hits}
    qd = Descriptors(ids=list(bench.query_ids), vectors=res.vectors[n_db:], meta=dict(meta, part="queries"))
    dbd = Descriptors(ids=list(bench.db_ids), vectors=res.vectors[:n_db], meta=dict(meta, part="database"))
    return qd, dbd


def describe_poolings(
    bench: Benchmark,
    model: str,
    poolings: dict[str, Any],
    *,
    imsize: int,
    scale_sets: dict[str, Sequence[float]],
    weights: str = "default",
    crop: bool = True,
    bow_sample: int = 200,
    bow_per_image: int = 300,
    seed: int = 0,
    log: Any = None,
) -> dict[str, dict[str, tuple[Descriptors, Descriptors]]]:
    """Several poolings compared on one backbone pass: {pooling name: {scale-set label: (queries,
    database)}}.

    Each image (queries cropped) runs through backbone ``model`` once per scale of the union of
    ``scale_sets``; the feature maps are kept (float16) and every pooling of ``poolings`` (name ->
    :class:`cbir.pooling.Pooling`) is applied to them exactly as ``RetrievalNet.pool`` (pooling, L2)
    and :func:`cbir.extract.extract` (scales combined by the pooling's generalised mean, L2) do. A
    BoW pooling without a codebook is fitted on database maps at scale 1 (``bow_sample`` images,
    ``bow_per_image`` random positions each, as :func:`cbir.extract.fit_bow`). CPU, batch 1, fp32
    compute. ``log(text)`` receives progress lines.
    """
    import torch

    from ..extract import image_tensor, load_image, rescale
    from ..extraction.bow import fit_bow_on_maps
    from ..model import build_model

    net = build_model(model, pooling="gem", weights=weights)
    scales = sorted({float(s) for ss in scale_sets.values() for s in ss}, reverse=True)
    boxes = list(bench.query_bboxes) if crop else [None] * len(bench.query_paths)

    def maps_of(paths: Sequence[Path], bxs: Sequence[Any], what: str) -> list[dict[float, Any]]:
        out = []
        with torch.inference_mode():
            for i, (path, box) in enumerate(zip(paths, bxs)):
                if log is not None and i % 25 == 0:
                    log(f"{what}: {i}/{len(paths)}")
                x = image_tensor(load_image(path, box), imsize, net.mean, net.std)[None]
                per = {}
                for s in scales:
                    xs = rescale(x, s)  # the extractor's resize, minimum side included
                    per[s] = net.features(xs).half()
                out.append(per)
        return out

    db_maps = maps_of(bench.db_paths, [None] * len(bench.db_paths), "database")
    q_maps = maps_of(bench.query_paths, boxes, "queries")
    result: dict[str, dict[str, tuple[Descriptors, Descriptors]]] = {}
    for name, pool in poolings.items():
        pool = pool.eval()
        if log is not None:
            log(f"pooling: {name}")
        if getattr(pool, "name", "") == "bow" and not bool(pool.fitted):
            rng = np.random.default_rng(seed)
            pick = sorted(rng.choice(len(db_maps), size=min(bow_sample, len(db_maps)), replace=False).tolist())
            fit_bow_on_maps(pool, [db_maps[i][1.0] for i in pick], rng=rng, per_image=bow_per_image, seed=seed)
        result[name] = {}
        for label, ss in scale_sets.items():
            ss = [float(s) for s in ss]
            meta = {"model": model, "pooling": getattr(pool, "name", name), "pooling_params": pool.params(),
                    "imsize": imsize, "scales": ss, "cropped_queries": crop, "benchmark": bench.name}
            q = Descriptors(ids=list(bench.query_ids), vectors=_pool_maps(pool, q_maps, ss), meta=dict(meta))
            db = Descriptors(ids=list(bench.db_ids), vectors=_pool_maps(pool, db_maps, ss), meta=dict(meta))
            result[name][label] = (q, db)
    return result


def _pool_maps(pool: Any, maps: list[dict[float, Any]], scales: Sequence[float]) -> np.ndarray:
    """(N, D): per scale pooling + L2, scales combined by the pooling's generalised mean, L2."""
    import torch
    import torch.nn.functional as F

    from ..extract import combine_scales

    rows = []
    with torch.inference_mode():
        for per_image in maps:
            vs = torch.stack([F.normalize(pool(per_image[s].float()).float(), dim=-1) for s in scales])
            v = vs[0] if len(scales) == 1 else combine_scales(vs, pool.multiscale_p())
            rows.append(v[0].numpy())
    return np.stack(rows).astype(np.float32)


def lookup(bench: Benchmark, features: str | os.PathLike[str] | Descriptors,
           query_features: str | os.PathLike[str] | Descriptors | None = None) -> tuple[Descriptors, Descriptors]:
    """(queries, database) rows of saved descriptors (a `cbir extract` folder), found by the
    benchmark's image ids; ``query_features`` holds separately described (cropped) queries.
    KeyError naming the first missing id."""
    feats = features if isinstance(features, Descriptors) else Descriptors.load(features, mmap=True)
    qfeats = feats if query_features is None else (
        query_features if isinstance(query_features, Descriptors) else Descriptors.load(query_features, mmap=True))
    where_db = "the descriptors" if isinstance(features, Descriptors) else str(features)
    where_q = where_db if query_features is None else (
        "the query descriptors" if isinstance(query_features, Descriptors) else str(query_features))

    def take(desc: Descriptors, names: list[str], what: str) -> Descriptors:
        try:
            rows = desc.row_of(names)
        except KeyError as exc:
            raise KeyError(f"{what}: {exc.args[0]}") from None
        return Descriptors(ids=list(names), vectors=np.asarray(desc.vectors[rows], dtype=np.float32),
                           meta={k: v for k, v in desc.meta.items() if k != "job"})

    db = take(feats, list(bench.db_ids), f"database image of {bench.name} missing in {where_db}")
    q = take(qfeats, list(bench.query_ids), f"query of {bench.name} missing in {where_q}")
    q.meta["features"], db.meta["features"] = where_q, where_db
    return q, db


def with_distractors(db: np.ndarray, distractors: str | os.PathLike[str] | Descriptors,
                     block: int = 65536) -> np.ndarray:
    """Database rows followed by the distractors' rows (a `cbir extract` folder, memory-mapped and
    copied in blocks): ground-truth indices are unchanged and every distractor is a negative (the
    revisitop +1M setting). Needs N x D x 4 bytes of memory."""
    dis = distractors if isinstance(distractors, Descriptors) else Descriptors.load(distractors, mmap=True)
    db = np.asarray(db, dtype=np.float32)
    if dis.dim != db.shape[1]:
        raise ValueError(f"distractor descriptors are {dis.dim}-D, the database {db.shape[1]}-D")
    out = np.empty((db.shape[0] + len(dis), db.shape[1]), dtype=np.float32)
    out[: db.shape[0]] = db
    for start in range(0, len(dis), block):
        out[db.shape[0] + start: db.shape[0] + start + block] = dis.vectors[start:start + block]
    return out
