"""Spatial verification re-ranking, cross-set: choose on one shared set, report on the other.

    .venv/bin/python benchmarks/verify_rerank.py extract  [--cache DIR] [--workers 2]
    .venv/bin/python benchmarks/verify_rerank.py inliers  [--cache DIR] [--features 512,1024,2048]
    .venv/bin/python benchmarks/verify_rerank.py pairs    [--cache DIR]      # pair precision / recall
    .venv/bin/python benchmarks/verify_rerank.py table    [--cache DIR] [--json out.json]

Sets: rparis6k-250 (revisitop E / M / H, queries cropped to their box) and holidays-805 (Holidays
mAP = Medium; whole-image queries that are database photos, left out of their own ranking by the
gnd's junk). Global descriptors: ``cbir.pipeline.describe`` with the default model (Lite0 + GeM,
512 px, 3 scales), cached under ``CACHE/descriptors``.

Local features (``extract``): SIFT through pycolmap at 1024 px, ``first_octave`` -1, up to 4096
descriptors, RootSIFT, every database photo (and the cropped queries of rparis6k-250) once, in a
:class:`cbir.local.store.LocalFeatureStore` under ``CACHE/local/<set>/<settings key>``. Fewer
features are the *coarsest* ``n`` of those (exactly what ``extract_local`` keeps with
``max_features=n``: COLMAP lists its DoG levels from fine to coarse), so one extraction serves
every ``max_features``.

``inliers``: for every query, the union of the top-100 of the raw ranking and of the ranking with
the shipped recipe (holidays805-lite0) is verified against the query with each ``max_features``
and each RANSAC model (homography, fundamental, COLMAP two-view), inlier counts cached in
``CACHE/inliers/<set>-<n>.npz``.

``pairs``: precision / recall of "inliers >= t" over the top-100 pairs of the raw ranking that the
ground truth judges (positives: easy + hard; negatives: not positive and not junk).

``table``: mAP of raw / + spatial verification (top K reordered by a combination rule) / +
verified query expansion / + the default re-ranking (``Rerank(qe=2, dba=5, diffusion={})``) /
the recipe as base; the settings are chosen on one set (best mean of Medium and Hard, or the
Holidays mAP) and applied to the other.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARED = Path(os.environ.get("CBIR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = {
    "rparis6k-250": ("data/rparis6k-250/gnd_rparis6k_subset250.pkl", True),
    "holidays-805": ("data/holidays-805/gnd_holidays805.pkl", False),
}
FEATURES = (512, 1024, 2048)
MODELS = ("homography", "fundamental", "two_view")
TOP = 100


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def bench(name: str):
    from cbir.pipeline import load_benchmark

    return load_benchmark(SHARED / SETS[name][0])


def store_settings():
    from cbir.local.features import LocalFeatureSettings

    return LocalFeatureSettings(max_size=1024, max_features=4096, first_octave=-1, root=True)


def store_of(cache: Path, name: str, settings=None):
    from cbir.local.store import LocalFeatureStore

    settings = settings or store_settings()
    return LocalFeatureStore(cache / "local" / name / settings.key(), settings)


def query_key(name: str, b, i: int) -> str:
    """Store key of query i: a database photo's key (whole-image queries) or its cropped copy."""
    return f"query:{b.query_ids[i]}" if SETS[name][1] else b.query_ids[i]


def cmd_extract(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from cbir.local.store import extract_to_store

    for name in args.sets:
        b = bench(name)
        st = store_of(args.cache, name)
        paths, keys, boxes = list(b.db_paths), list(b.db_ids), [None] * len(b.db_ids)
        if SETS[name][1]:
            paths += list(b.query_paths)
            keys += [query_key(name, b, i) for i in range(len(b.query_ids))]
            boxes += list(b.query_bboxes)
        t0 = time.perf_counter()
        with tqdm(total=len(keys), desc=f"{name} SIFT", file=sys.stderr) as bar:
            res = extract_to_store(paths, keys, None, st, bboxes=boxes, progress=bar.update,
                                   workers=args.workers, shard_size=128, device="cpu")
        dt = time.perf_counter() - t0
        log(f"{name}: {res['extracted']} extracted, {res['skipped']} already there, failed {res['failed']}, "
            f"{dt:.0f} s ({res['extracted'] / max(dt, 1e-9):.2f} img/s, {args.workers} workers)")


def global_descriptors(cache: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    from cbir.model import ModelSpec
    from cbir.pipeline import describe

    q, db = describe(bench(name), ModelSpec("efficientnet_lite0", "gem"), cache_dir=cache / "descriptors")
    return np.asarray(q.vectors, np.float32), np.asarray(db.vectors, np.float32)


def base_rankings(cache: Path, name: str) -> dict[str, np.ndarray]:
    """{"raw": scores, "recipe": scores} (nq, n) of the two bases."""
    from cbir.rerank.recipe import Recipe

    q, db = global_descriptors(cache, name)
    raw = q @ db.T
    recipe, _ = Recipe.load("holidays805-lite0").apply(q, db)
    return {"raw": raw, "recipe": recipe}


def truncate(f, n: int):
    """The coarsest n features (= extract_local with max_features=n, same other settings)."""
    from cbir.local.features import LocalFeatures

    if len(f) <= n:
        return f
    return LocalFeatures(f.keypoints[-n:].copy(), f.descriptors[-n:].copy(), f.size, f.scale)


def cmd_inliers(args: argparse.Namespace) -> None:
    from cbir.local.matching import match_many
    from cbir.local.verify import VerifySettings, geometric_check

    for name in args.sets:
        b = bench(name)
        st = store_of(args.cache, name)
        ranks = base_rankings(args.cache, name)
        nq = len(b.query_ids)
        cand = []
        for i in range(nq):
            top = set()
            for s in ranks.values():
                row = s[i].copy()
                for j in b.gnd[i].get("junk", []) if not SETS[name][1] else []:
                    row[j] = -np.inf  # Holidays: the query itself is not a candidate
                top.update(np.argsort(-row, kind="stable")[:TOP].tolist())
            cand.append(sorted(top))
        db_keys = list(b.db_ids)
        for n in args.features:
            out = args.cache / "inliers" / f"{name}-{n}.npz"
            if out.exists():
                log(f"{out} exists")
                continue
            counts = {m: np.full((nq, len(b.db_ids)), -1, dtype=np.int32) for m in MODELS}
            putative = np.full((nq, len(b.db_ids)), -1, dtype=np.int32)
            t_match = t_ransac = 0.0
            t0 = time.perf_counter()
            for i in range(nq):
                qf = truncate(st.get(query_key(name, b, i)), n)
                cf = [truncate(st.get(db_keys[j]), n) for j in cand[i]]
                t = time.perf_counter()
                ms = match_many(qf, cf, device="cpu")
                t_match += time.perf_counter() - t
                t = time.perf_counter()
                for m in MODELS:
                    vs = VerifySettings(model=m)
                    for j, c, mm in zip(cand[i], cf, ms):
                        counts[m][i, j] = geometric_check(qf, c, mm, vs).inliers
                t_ransac += time.perf_counter() - t
                putative[i, cand[i]] = [len(mm) for mm in ms]
                if i % 20 == 0:
                    log(f"{name} n={n}: query {i}/{nq}, {time.perf_counter() - t0:.0f} s")
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(out, putative=putative, **counts)
            log(f"{name} n={n}: {sum(len(c) for c in cand)} pairs, matching {t_match:.1f} s, "
                f"RANSAC (3 models) {t_ransac:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("extract", "inliers", "pairs", "table"))
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("CBIR_BENCH_CACHE", "/tmp/cbir-verify-cache")))
    p.add_argument("--sets", nargs="+", default=list(SETS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--features", type=lambda s: [int(v) for v in s.split(",")], default=list(FEATURES))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    {"extract": cmd_extract, "inliers": cmd_inliers}[args.stage](args)


if __name__ == "__main__":
    main()
