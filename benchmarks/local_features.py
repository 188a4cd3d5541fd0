"""Speed of the local-feature stage: SIFT extraction (img/s) and verification of a query's top 100.

    .venv/bin/python benchmarks/local_features.py [--images 24] [--queries 5] [--top 100] [--cache DIR]

On rparis6k-250 (``$CBIR_SHARED/data/rparis6k-250``), at the defaults of
:class:`cbir.local.features.LocalFeatureSettings` / :class:`cbir.local.verify.VerifySettings`:

1. extraction: ``extract_local`` on ``--images`` photos in this process (img/s), then
   ``extract_to_store`` with 2 worker processes on the same photos (img/s, and the speed-up);
   ``first_octave=0`` for comparison (faster, fewer fine features);
2. verification of the top ``--top`` of each of ``--queries`` cropped queries (global ranking:
   Lite0 + GeM through ``cbir.pipeline.describe``, cached): the features of the database photos
   are extracted once into a store under ``--cache``; per query the time of ``verify_candidates``
   (batched matching + RANSAC; the query's own SIFT is reported apart), the median over queries;
   and the baseline: pycolmap's matcher pair by pair + the same RANSAC, on the first query
   (ratio = baseline / batched, same inlier counts checked);
3. the GIL: 2 threads verifying 2 queries each vs one thread doing all 4 (pycolmap holds the GIL
   during RANSAC; torch releases it in the matrix products).

Timings depend on the machine's load: the ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("CBIR_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def machine_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({cpu}), load average {load:.1f} at the start"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("CBIR_BENCH_CACHE", "/tmp/cbir-verify-cache")))
    args = p.parse_args()

    import tempfile

    from cbir.local.features import LocalFeatureSettings, extract_local
    from cbir.local.matching import match
    from cbir.local.store import LocalFeatureStore, extract_to_store
    from cbir.local.verify import VerifySettings, geometric_check, verify_candidates
    from cbir.model import ModelSpec
    from cbir.pipeline import describe, load_benchmark

    root = SHARED / "data" / "rparis6k-250"
    bench = load_benchmark(root / "gnd_rparis6k_subset250.pkl")
    settings = LocalFeatureSettings()
    vs = VerifySettings()
    print(f"machine: {machine_note()}")
    print(f"settings: {settings.model_dump()} ({settings.key()}); verification: {vs.model} "
          f"(max_error {vs.max_error}, min_matches {vs.min_matches})")

    # 1. extraction
    paths = list(bench.db_paths[: args.images])
    extract_local(paths[0], settings, device="cpu")  # warm-up (pycolmap import)
    t = time.perf_counter()
    counts = [len(extract_local(pth, settings, device="cpu")) for pth in paths]
    one = len(paths) / (time.perf_counter() - t)
    fast = settings.model_copy(update={"first_octave": 0})
    t = time.perf_counter()
    fast_counts = [len(extract_local(pth, fast, device="cpu")) for pth in paths]
    one_fast = len(paths) / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        extract_to_store(paths, [str(i) for i in range(len(paths))], settings, Path(tmp) / "s", workers=2, device="cpu")
        two = len(paths) / (time.perf_counter() - t)
    print(f"\nextraction, {len(paths)} photos of 1024 px: {one:.2f} img/s in this process "
          f"(median {statistics.median(counts):.0f} features); 2 worker processes {two:.2f} img/s "
          f"({two / one:.2f}x, process start included); first_octave=0: {one_fast:.2f} img/s "
          f"({one_fast / one:.2f}x, median {statistics.median(fast_counts):.0f} features)")

    # 2. verification of the top 100
    store = LocalFeatureStore(args.cache / "speed" / settings.key(), settings)
    q, db = describe(bench, ModelSpec("efficientnet_lite0", "gem"), cache_dir=args.cache / "descriptors")
    scores = np.asarray(q.vectors) @ np.asarray(db.vectors).T
    qn = min(args.queries, len(bench.query_ids))
    tops = np.argsort(-scores, axis=1, kind="stable")[:qn, : args.top]
    need = sorted(set(tops.ravel().tolist()))
    log(f"extracting {len(need)} database photos into {store.path} (once)")
    extract_to_store([bench.db_paths[j] for j in need], [bench.db_ids[j] for j in need], None, store, workers=2,
                     device="cpu")
    q_times, v_times, feats = [], [], []
    for i in range(qn):
        t = time.perf_counter()
        qf = extract_local(bench.query_paths[i], settings, bench.query_bboxes[i], device="cpu")
        q_times.append(time.perf_counter() - t)
        cands = store.get_many([bench.db_ids[j] for j in tops[i]])
        t = time.perf_counter()
        counts = verify_candidates(qf, cands, vs, device="cpu")
        v_times.append(time.perf_counter() - t)
        feats.append((qf, cands, counts))
    print(f"\nverification of the top {args.top} ({qn} queries): median {statistics.median(v_times):.3f} s per query "
          f"(min {min(v_times):.3f}, max {max(v_times):.3f}); the query's own SIFT median "
          f"{statistics.median(q_times):.3f} s; verified (>= 15 inliers) per query: "
          f"{[int((c >= 15).sum()) for _, _, c in feats]}")
    qf, cands, counts = feats[0]
    t = time.perf_counter()
    base = [geometric_check(qf, c, match(qf, c, vs.match, device="cpu"), vs).inliers for c in cands]
    tb = time.perf_counter() - t
    same = base == counts.tolist()
    print(f"baseline, pycolmap's matcher pair by pair + the same RANSAC, query 0: {tb:.3f} s vs batched "
          f"{v_times[0]:.3f} s: {tb / v_times[0]:.1f}x; same inlier counts: {same}")

    # 3. the GIL
    work = [(f[0], f[1]) for f in feats[:4]]
    while len(work) < 4:
        work += work[: 4 - len(work)]
    t = time.perf_counter()
    for qf, cands in work:
        verify_candidates(qf, cands, vs, device="cpu")
    serial = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda w: verify_candidates(w[0], w[1], vs, device="cpu"), work))
    threaded = time.perf_counter() - t
    print(f"\n4 queries: one thread {serial:.2f} s, two threads {threaded:.2f} s ({serial / threaded:.2f}x)")
    print(f"machine at the end: load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
