"""Search speed and recall@k of the index types, through the cbir.index API, on clustered synthetic descriptors.

For each configuration: build time, batch throughput (queries/s over --nq queries at once),
single-query latency (ms, queries one at a time), and recall@k against the exact top-k of the
same run (the baseline; speed-ups are reported as ratios to it).

Data: unit vectors around --clusters random centres, x = normalise(c + spread * g / sqrt(d)),
g ~ N(0, I); queries are drawn the same way (not from the database). Uniform noise would make
ANN recall meaningless (no neighbour structure).

    python benchmarks/search.py --n 1000000 --dim 512 --types exact,ivfpq
    python benchmarks/search.py --n 100000 --dim 512 --types exact,hnsw
    python benchmarks/search.py --n 1000000 --dim 2048 --types exact --device cuda      # GPU, fp16
    python benchmarks/search.py --n 1000000 --dim 512 --types faiss \
        --factory "IVF16384_HNSW32,PQ64x4fs,RFlat" --target 0.95 --json out.json

--types faiss: each --factory string (repeatable) is built, then its search parameters (nprobe,
quantizer_efSearch, k_factor_rf, ...) are chosen by ``Index.tune`` (faiss ParameterSpace) for
recall@k >= --target on --tune-nq *held-out* queries drawn from the same distribution as, but
distinct from, the --nq reported queries; the reported recall and speed are on the reported queries.
Without "exact" in --types, the exact baseline is a bare exact_topk over the data (no index copy).
It also prints the share of the exact top-k that comes from each query's own centre: the rest lie
near-orthogonal to the query in other centres' cells, the part of recall that costs the most.
--rounds R times each configuration R times and reports the median; --lean (one faiss factory)
drops the benchmark's copy of the data once the index holds it (1M x 2048 in 24 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from cbir.index import Index


def clustered_labelled(n: int, dim: int, clusters: int, spread: float, seed: int,
                       chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors normalise(c_j + spread * g / sqrt(dim)) (c_j unit centres,
    g ~ N(0, I)) and each vector's centre j (n,) int64."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    labels = np.empty(n, np.int64)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        labels[s:s + m] = rng.integers(0, clusters, m)
        x = centres[labels[s:s + m]]
        x += (spread / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x
    return out, labels


def own_cluster_share(want: np.ndarray, labels: np.ndarray, query_labels: np.ndarray) -> float:
    """Mean share of each query's exact top-k that comes from the query's own centre. The rest are
    points of other centres, near-orthogonal to the query: an inverted file finds them only by
    visiting most of its lists, so 1 - share bounds what cheap settings can reach."""
    return float(np.mean(labels[want] == query_labels[:, None]))


def recall_at(got: np.ndarray, want: np.ndarray) -> float:
    """mean over queries of |got_i ∩ want_i| / k."""
    k = want.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(got, want)]))


def timed_search(index: Index, q: np.ndarray, k: int, single: int, rounds: int = 1) -> tuple[np.ndarray, float, float]:
    """(ids of the batched search, queries/s of the median batched round, median ms of one query alone)."""
    index.search_vectors(q[:2], k)  # warm-up (builds caches, uploads to the GPU)
    batch, one = [], []
    for _ in range(max(rounds, 1)):
        t = time.perf_counter()
        _, ids = index.search_vectors(q, k)
        batch.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(single):
            index.search_vectors(q[i:i + 1], k)
        one.append((time.perf_counter() - t) / max(single, 1))
    return ids, len(q) / float(np.median(batch)), 1000 * float(np.median(one))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="database size (default 1,000,000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--nq", type=int, default=1000, help="queries (default 1000)")
    ap.add_argument("--k", type=int, default=100, help="recall@k (default 100)")
    ap.add_argument("--single", type=int, default=50, help="queries timed one at a time (default 50)")
    ap.add_argument("--clusters", type=int, default=None, help="cluster centres (default n/100: ~100 images per place)")
    ap.add_argument("--spread", type=float, default=1.0, help="noise scale around the centres (default 1.0)")
    ap.add_argument("--types", default="exact,ivfpq,hnsw")
    ap.add_argument("--device", default="cpu", help="device of the exact search: cpu or cuda (fp16)")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument("--nprobe", default="16,32,64", help="comma-separated nprobe values to measure")
    ap.add_argument("--refine", default="0,4,10", help="comma-separated refine factors to measure")
    ap.add_argument("--M", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--ef-search", default="128,256,512", help="comma-separated efSearch values to measure")
    ap.add_argument("--factory", action="append", default=[], help="faiss index_factory string (repeatable; --types faiss)")
    ap.add_argument("--target", type=float, default=0.95, help="recall@k target for the automatic tuning (default 0.95)")
    ap.add_argument("--tune-nq", type=int, default=1000, help="held-out tuning queries (default 1000)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration; the median is reported (default 3)")
    ap.add_argument("--lean", action="store_true",
                    help="--types faiss with one --factory: drop the benchmark's own copy of the data once the index "
                         "holds it (peak ~2 copies instead of 3; 1M x 2048 then fits in 24 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)

    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if args.lean and (types != ["faiss"] or len(args.factory) > 1):
        ap.error("--lean needs --types faiss and one --factory")
    clusters = args.clusters or max(10, args.n // 100)
    t = time.perf_counter()
    x, labels = clustered_labelled(args.n + args.nq + args.tune_nq, args.dim, clusters, args.spread, args.seed)
    tq = x[args.n + args.nq:].copy()  # copies: views would keep the whole generated array alive (--lean)
    q = x[args.n:args.n + args.nq].copy()
    x = x[:args.n]
    q_labels, labels = labels[args.n:args.n + args.nq], labels[:args.n]
    print(f"data: {args.n:,} x {args.dim} float32 ({x.nbytes / 2**30:.1f} GiB), {clusters} clusters, spread "
          f"{args.spread}, {args.nq} queries, k={args.k}; generated in {time.perf_counter() - t:.1f} s", flush=True)
    import faiss
    import torch

    env = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
           "faiss": faiss.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"env: {env}", flush=True)
    paths = [str(i) for i in range(args.n)]
    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        base = rows[0]
        print(f"{row['type']:<6} {json.dumps(row['params']):<44} build {row['build_s']:8.1f} s  "
              f"{row['qps']:10.1f} q/s  ({row['qps'] / base['qps']:6.2f}x exact)  1 query {row['single_ms']:8.2f} ms  "
              f"recall@{args.k} {row['recall']:.4f}", flush=True)

    # exact search: the baseline and the ground truth
    if "exact" in types or args.device != "cpu":
        t = time.perf_counter()
        exact = Index(args.dim, "exact", device=args.device)
        exact.add(x, paths)
        build = time.perf_counter() - t
        want, qps, one = timed_search(exact, q, args.k, args.single, args.rounds)
        del exact
    else:  # memory-lean: no index copy of the data
        from cbir.index.tuning import exact_ground_truth

        build = 0.0
        exact_ground_truth(x, q[:2], args.k)
        times = []
        for _ in range(max(args.rounds, 1)):
            t = time.perf_counter()
            want = exact_ground_truth(x, q, args.k)
            times.append(time.perf_counter() - t)
        qps = len(q) / float(np.median(times))
        t = time.perf_counter()
        for i in range(min(args.single, 10)):
            exact_ground_truth(x, q[i:i + 1], args.k)
        one = 1000 * (time.perf_counter() - t) / max(min(args.single, 10), 1)
    share = own_cluster_share(want, labels, q_labels)
    print(f"exact top-{args.k}: {100 * share:.1f} % from the query's own centre, {100 * (1 - share):.1f} % from "
          f"other centres (near-orthogonal to the query: found only by visiting most inverted lists)", flush=True)
    report({"type": "exact", "params": {"device": args.device}, "build_s": build, "qps": qps, "single_ms": one,
            "recall": 1.0, "n": args.n, "dim": args.dim, "own_centre_share": share})
    if "exact" not in types:
        rows[0]["baseline_only"] = True

    if "faiss" in types:
        for factory in args.factory or ["IVF4096_HNSW32,PQ64x4fs,RFlat"]:
            t = time.perf_counter()
            idx = Index(args.dim, "faiss", {"factory": factory}, device="cpu")
            idx.add(x, paths)
            if args.lean:  # the index holds its own copy; ours is not needed any more
                del x
            idx.search_vectors(q[:1], 1)  # train + add now
            build = time.perf_counter() - t
            t = time.perf_counter()
            tuned = idx.tune(tq, target=args.target, k=args.k)
            tune_s = time.perf_counter() - t
            print(f"tuned {factory} in {tune_s:.1f} s on {len(tq)} held-out queries: {tuned.search} "
                  f"(held-out recall {tuned.recall:.4f}, {tuned.ms_per_query:.3f} ms/query); curve:", flush=True)
            for rec, ms, key in tuned.curve:
                print(f"    recall {rec:.4f}  {ms:8.3f} ms/query  {key}", flush=True)
            got, qps, one = timed_search(idx, q, args.k, args.single, args.rounds)
            report({"type": "faiss", "params": {"factory": factory, "search": idx.params["search"]}, "build_s": build,
                    "tune_s": tune_s, "qps": qps, "single_ms": one, "batch_ms": 1000.0 / qps,
                    "recall": recall_at(got, want), "n": args.n, "dim": args.dim, "tuned": tuned.to_dict()})
            del idx

    if "ivfpq" in types:
        t = time.perf_counter()
        ivf = Index(args.dim, "ivfpq", {"nlist": args.nlist, "m": args.m, "nbits": args.nbits}, device="cpu")
        ivf.add(x, paths)
        ivf.search_vectors(q[:1], 1)  # train + add now
        build = time.perf_counter() - t
        for nprobe in map(int, args.nprobe.split(",")):
            for refine in map(int, args.refine.split(",")):
                ivf.set_search_params(nprobe=nprobe, refine=refine)
                got, qps, one = timed_search(ivf, q, args.k, args.single, args.rounds)
                report({"type": "ivfpq", "params": {**ivf.params}, "build_s": build, "qps": qps, "single_ms": one,
                        "recall": recall_at(got, want), "n": args.n, "dim": args.dim})
        del ivf

    if "hnsw" in types:
        t = time.perf_counter()
        hnsw = Index(args.dim, "hnsw", {"M": args.M, "efConstruction": args.ef_construction}, device="cpu")
        hnsw.add(x, paths)
        hnsw.search_vectors(q[:1], 1)  # builds the graph
        build = time.perf_counter() - t
        for ef in map(int, args.ef_search.split(",")):
            hnsw.set_search_params(efSearch=ef)
            got, qps, one = timed_search(hnsw, q, args.k, args.single, args.rounds)
            report({"type": "hnsw", "params": {**hnsw.params}, "build_s": build, "qps": qps, "single_ms": one,
                    "recall": recall_at(got, want), "n": args.n, "dim": args.dim})

    if args.json:
        from cbir.fileio import atomic_write_json

        atomic_write_json(args.json, {"args": vars(args), "env": env, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
