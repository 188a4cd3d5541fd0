"""Online cost of diffusion for databases of 5k, 100k and 1M synthetic descriptors.

Synthetic data shaped like real global descriptors: unit vectors in D = 128 dims drawn around
n/50 random "landmark" centres (noise 0.6 per dimension-norm, so a descriptor's cosine to its own
centre is ~0.85 and to others ~0), 70 queries drawn the same way. For every size it measures,
in one run on this CPU:

- baseline: exact search of the 70 queries' top-R (numpy q @ db.T + argpartition, as
  diffusion_scores does; faiss IndexFlatIP with k = 1000 was slower) -- the ratio reference;
- graph: offline build of the kNN affinity graph (exact faiss search up to 100k, IVF above) and
  its memory (csr data + indices + indptr);
- online diffusion for all 70 queries, batched: full CG on the whole graph (5k only), truncated
  to each query's top-R region (Iscen et al.), and at 5k the offline form (Yang et al.):
  precompute time, memory, online time.

Usage: python benchmarks/rerank.py [--sizes 5000,100000,1000000] [--dim 128] [--repeat 3]

--through-index: the path `cbir search --diffusion` and the service take instead: an ``Index``
(exact, or --index-type faiss --factory STR) whose kNN graph is built once (``Index.build_graph``:
exact faiss search up to 200k images, IVF above) and stored; each query is answered by
``Index.search_rerank`` (top-R region from the index's search structure + truncated diffusion on the
stored graph), one query at a time (median ms) and batched; plus the graph upkeep of adding and
removing 10 images.
The machine is shared: times are medians of --repeat runs and are reported with ratios to the
baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import scipy.sparse as sp
from pathlib import Path

from cbir.descriptors import l2_normalize
from cbir.rerank.knn import topk
from cbir.rerank.diffusion import (
    PAPER,
    DiffusionParams,
    OfflineDiffusion,
    truncated_diffusion,
    diffusion_scores,
    knn_graph,
)


def synthetic(n: int, nq: int, d: int, seed: int = 0, per_class: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = max(1, n // per_class)
    centres = l2_normalize(rng.standard_normal((c, d), dtype=np.float32))
    db = np.empty((n, d), dtype=np.float32)
    step = 200_000
    for s in range(0, n, step):
        m = min(step, n - s)
        lab = rng.integers(0, c, m)
        db[s : s + m] = l2_normalize(centres[lab] + rng.standard_normal((m, d), dtype=np.float32) * (0.6 / np.sqrt(d)))
    q = l2_normalize(centres[rng.integers(0, c, nq)] + rng.standard_normal((nq, d), dtype=np.float32) * (0.6 / np.sqrt(d)))
    return db, q


CPU_TIMES: dict[str, float] = {}


def timed(fn, repeat: int, name: str | None = None) -> tuple[float, object]:
    """Median wall time of ``repeat`` runs; the median CPU time (all threads) goes to CPU_TIMES[name]."""
    times, cpu, out = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if name:
        CPU_TIMES[name] = float(np.median(cpu))
    return float(np.median(times)), out


def graph_bytes(w) -> int:
    return int(w.data.nbytes + w.indices.nbytes + w.indptr.nbytes)


def run(n: int, d: int, nq: int, repeat: int, params: DiffusionParams, args_exact_max: int = 20_000, cache: Path | None = None) -> dict:
    CPU_TIMES.clear()
    res: dict = {"n": n, "dim": d, "queries": nq}
    db, q = synthetic(n, nq, d)
    R = params.trunc
    res["baseline_search_s"], (s_top, regions) = timed(lambda: topk(q @ db.T, R), repeat, "search")
    nlist = 0 if n <= args_exact_max else int(4 * np.sqrt(n))
    cached = cache / f"graph_n{n}_d{d}_k{params.k}_nlist{nlist}.npz" if cache else None
    if cached is not None and cached.exists():
        w = sp.load_npz(cached).tocsr()
        res["graph_build_s"] = float(json.loads(cached.with_suffix(".json").read_text())["build_s"])
    else:
        t = time.perf_counter()
        w = knn_graph(db, k=params.k, gamma=params.gamma, mutual=params.mutual, nlist=nlist, nprobe=8)
        res["graph_build_s"] = time.perf_counter() - t
        if cached is not None:
            cache.mkdir(parents=True, exist_ok=True)
            sp.save_npz(cached, w)
            cached.with_suffix(".json").write_text(json.dumps({"build_s": res["graph_build_s"]}))
    res["graph_knn"] = "exact" if nlist == 0 else f"IVF{nlist}, nprobe 8"
    res["graph_edges"] = int(w.nnz)
    res["graph_bytes"] = graph_bytes(w)
    if n <= 20_000:
        full = DiffusionParams(**{**params.to_dict(), "trunc": 0})
        res["full_online_s"], _ = timed(lambda: diffusion_scores(q, db, full, graph=w, sim=q @ db.T), repeat, "full")
        t = time.perf_counter()
        off = OfflineDiffusion.build(db, full, topm=200, graph=w)
        res["offline_build_s"] = time.perf_counter() - t
        res["offline_bytes"] = off.nbytes()
        res["offline_online_s"], _ = timed(lambda: off.scores(q, db), repeat, "offline")

    # online truncated diffusion = top-R search (the baseline) + diffusion on the regions
    res["region_diffusion_s"], _ = timed(lambda: truncated_diffusion(s_top, regions, w, params), repeat, "region")
    res["trunc_online_s"] = res["baseline_search_s"] + res["region_diffusion_s"]
    res["cpu_s"] = dict(CPU_TIMES)
    # the dense (nq, n) score matrix that rerank()/diffusion_scores() return, for reference
    res["trunc_dense_scores_s"], _ = timed(lambda: diffusion_scores(q, db, params, graph=w, sim=q @ db.T), 1)
    for key in [k for k in res if k.endswith("_online_s")]:
        res[key.replace("_online_s", "_ms_per_query")] = 1000 * res[key] / nq
        res[key.replace("_online_s", "_vs_search")] = res[key] / res["baseline_search_s"]
    del db, q, w
    return res


def run_index(n: int, d: int, nq: int, params: DiffusionParams, kind: str = "exact", factory: str | None = None) -> dict:
    """Per-query diffusion through cbir.index.Index with its stored graph (see module doc)."""
    from cbir.index import Index
    from cbir.rerank import Rerank

    res: dict = {"n": n, "dim": d, "queries": nq, "index": kind, "factory": factory}
    db, q = synthetic(n, nq, d)
    extra, _ = synthetic(10, 1, d, seed=1)
    t = time.perf_counter()
    idx = Index(d, kind, {"factory": factory} if kind == "faiss" else None, device="cpu")
    idx.add(db, [str(i) for i in range(n)])
    idx.search_vectors(q[:1], 1)
    res["index_build_s"] = time.perf_counter() - t
    del db
    t = time.perf_counter()
    idx.build_graph(params.k)
    res["graph_build_s"] = time.perf_counter() - t
    res["graph_exact"] = idx.graph.exact
    t = time.perf_counter()
    w = idx.affinity(params.k, params.gamma, params.mutual)
    res["affinity_s"] = time.perf_counter() - t
    res["graph_edges"], res["graph_bytes"] = int(w.nnz), graph_bytes(w)
    rr = Rerank(diffusion=params)
    idx.search_rerank(q[:1], 100, rr)  # warm-up
    one = []
    cpu = time.process_time()
    for i in range(nq):
        t = time.perf_counter()
        idx.search_rerank(q[i:i + 1], 100, rr)
        one.append(time.perf_counter() - t)
    res["cpu_ms_per_query_single"] = 1000 * (time.process_time() - cpu) / nq  # all threads; load-independent-ish
    res["ms_per_query_single"] = 1000 * float(np.median(one))
    res["ms_per_query_single_p90"] = 1000 * float(np.percentile(one, 90))
    t = time.perf_counter()
    idx.search_rerank(q, 100, rr)
    res["ms_per_query_batched"] = 1000 * (time.perf_counter() - t) / nq
    t = time.perf_counter()
    new = idx.add(extra, [f"new{i}" for i in range(10)])
    res["add10_s"] = time.perf_counter() - t
    t = time.perf_counter()
    idx.remove(new)
    res["remove10_s"] = time.perf_counter() - t
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5000,100000,1000000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=70)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--trunc", type=int, default=1000)
    ap.add_argument("--exact-max", type=int, default=20_000,
                    help="build the graph by exact search up to this size, by faiss IVF above (default 20000)")
    ap.add_argument("--cache", default=None, help="keep built graphs here and reuse them (graph_build_s is then the cached build time)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--through-index", action="store_true", help="measure Index.search_rerank with the stored graph")
    ap.add_argument("--index-type", default="exact", choices=("exact", "faiss"))
    ap.add_argument("--factory", default=None, help="faiss factory string for --index-type faiss")
    args = ap.parse_args(argv)
    params = PAPER.model_copy(update={"k": args.k, "trunc": args.trunc})
    if args.through_index:
        print(f"# diffusion through cbir.index, {os.cpu_count()} CPUs, params {params.to_dict()}", flush=True)
        rows = []
        for n in [int(s) for s in args.sizes.split(",")]:
            rows.append(run_index(n, args.dim, args.queries, params, args.index_type, args.factory))
            print(json.dumps(rows[-1]), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
        return 0
    CPU_TIMES.clear()
    print(f"# diffusion timing, {os.cpu_count()} CPUs, params {params.to_dict()}", flush=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        r = run(n, args.dim, args.queries, args.repeat, params, args.exact_max, Path(args.cache) if args.cache else None)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print()
    print("| database | graph build (offline) | graph memory | top-R search, 70 q (baseline) | + diffusion on the regions, 70 q | online total per query | dense (70, n) scores via diffusion_scores | full CG, 70 q | offline form: precompute / memory / online 70 q |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        full = f"{r['full_online_s']:.3f} s (CPU {r['cpu_s']['full']:.3f} s)" if "full_online_s" in r else "-"
        off = (
            f"{r['offline_build_s']:.1f} s / {r['offline_bytes'] / 2**20:.1f} MiB / {r['offline_online_s'] * 1000:.1f} ms"
            if "offline_online_s" in r else "-"
        )
        print(
            f"| {r['n']:,} x {r['dim']} | {r['graph_build_s']:.1f} s ({r['graph_knn']}) | {r['graph_bytes'] / 2**20:.1f} MiB ({r['graph_edges']:,} edges) "
            f"| {r['baseline_search_s']:.3f} s (CPU {r['cpu_s']['search']:.3f} s) | {r['region_diffusion_s']:.3f} s (CPU {r['cpu_s']['region']:.3f} s; {r['region_diffusion_s'] / r['baseline_search_s']:.1f}x the search) "
            f"| {r['trunc_ms_per_query']:.1f} ms | {r['trunc_dense_scores_s']:.2f} s | {full} | {off} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
