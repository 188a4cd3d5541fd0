"""Exact search 1M x 2048 in fp16 on the GPU through ``cbir.index.Index``: batched queries/s.

The database (random unit vectors; the content does not change the cost of an exact search) is
added to an exact ``Index(dim, "exact", device="cuda")``, which keeps it on the GPU in float16
(``cbir.index.exact.database_tensor``). Timed after a warm-up:
- ``Index.search_vectors`` (scores + ids) and ``Index.search`` (hits with paths from the index's
  SQLite metadata) for --nq queries at once, top --k;
- ``cbir.index.exact.exact_topk`` on the same GPU tensor for several query-chunk sizes
  (``max_scores``: scores held at once), to show the best setting of the default;
- ``cbir.topk.chunked_topk`` with the database on the host (fp16 blocks sent to the GPU).

    python benchmarks/gpu_search.py --n 1000000 --dim 2048 --nq 10000 --k 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from cbir.index import Index  # noqa: E402  (no faiss needed for the exact type)
from cbir.index.exact import exact_topk  # noqa: E402


def unit_rows(n: int, dim: int, gen: torch.Generator, dev) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    step = 1 << 17
    for s in range(0, n, step):
        m = min(step, n - s)
        x = torch.randn((m, dim), generator=gen, device=dev)
        out[s:s + m] = torch.nn.functional.normalize(x, dim=1).cpu().numpy()
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--nq", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda (the figure), or cpu for a small smoke run")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    t = time.perf_counter()
    x = unit_rows(args.n, args.dim, gen, dev)
    q = unit_rows(args.nq, args.dim, gen, dev)
    print(f"{name}: {args.n:,} x {args.dim} database, {args.nq} queries, k={args.k} "
          f"(generated in {time.perf_counter() - t:.1f} s)", flush=True)
    res: dict = {"gpu": name, "n": args.n, "dim": args.dim, "nq": args.nq, "k": args.k,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    t = time.perf_counter()
    index = Index(args.dim, "exact", device=args.device)
    index.add(x, [f"img/{i}.jpg" for i in range(args.n)])
    res["add_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    index.search_vectors(q[:8], args.k)  # uploads the fp16 database
    sync()
    res["upload_s"] = round(time.perf_counter() - t, 2)
    print(f"Index.add {res['add_s']} s, first search (fp16 upload) {res['upload_s']} s", flush=True)

    index.search_vectors(q, args.k)
    sv = timed(lambda: index.search_vectors(q, args.k), args.rounds)
    res["search_vectors_qps"] = round(args.nq / sv, 1)
    print(f"Index.search_vectors: {args.nq / sv:10.0f} queries/s ({1000 * sv:.1f} ms for {args.nq})", flush=True)
    nh = min(args.nq, 2000)
    sh = timed(lambda: index.search(q[:nh], args.k), 1)
    res["search_hits_qps"] = round(nh / sh, 1)
    print(f"Index.search (Hit objects with paths, {nh} queries): {nh / sh:10.0f} queries/s", flush=True)
    one = timed(lambda: [index.search_vectors(q[i:i + 1], args.k) for i in range(50)], 1) / 50
    res["single_query_ms"] = round(1000 * one, 3)
    print(f"one query at a time: {1000 * one:.2f} ms", flush=True)

    db = index.backend._db  # the fp16 tensor the index searches
    sweep = {}
    for log2 in (26, 28, 30):
        f = lambda: exact_topk(q, db, args.k, max_scores=1 << log2)  # noqa: E731
        f()
        s = timed(f, args.rounds)
        sweep[f"2^{log2}"] = round(args.nq / s, 1)
        print(f"exact_topk max_scores=2^{log2}: {args.nq / s:10.0f} queries/s", flush=True)
    res["exact_topk_qps_by_max_scores"] = sweep

    from cbir.topk import chunked_topk

    xh = x.astype(np.float16)
    del index, db
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    else:
        xh = xh.astype(np.float32)  # the CPU path scores in float32
    nq2 = min(args.nq, 1000)
    f = lambda: chunked_topk(q[:nq2], xh, args.k, device=args.device, chunk_rows=1 << 17)  # noqa: E731
    f()
    s = timed(f, 1)
    res["chunked_topk_host_fp16_qps"] = round(nq2 / s, 1)
    print(f"cbir.topk.chunked_topk (database streamed from host memory, {nq2} queries): {nq2 / s:10.0f} queries/s "
          f"({s:.2f} s per pass)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
