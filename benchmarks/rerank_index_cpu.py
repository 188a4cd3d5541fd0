"""CPU time per query of ``Index.search_rerank`` (diffusion with the paper's parameters, R = 1000) at
large n, without the long kNN-graph build: the stored graph is a STAND-IN of the same degree (each
node's 50 "neighbours" drawn among the 100 nodes nearest to it in the order of one coordinate, with
their true similarities; non-positive ones drop out of W, so it is sparser than a real kNN graph).
It isolates the online cost (top-R search + diffusion on the region); the real graph's figures come
from ``benchmarks/rerank.py --through-index``.

    python benchmarks/rerank_index_cpu.py --n 1000000                                  # exact index
    python benchmarks/rerank_index_cpu.py --n 1000000 --factory IVF1024,Flat --search nprobe=16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rerank import synthetic  # noqa: E402

from cbir.index import Index  # noqa: E402
from cbir.index.graph import KnnGraph  # noqa: E402
from cbir.rerank.diffusion import PAPER  # noqa: E402
from cbir.rerank import Rerank  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=70)
    ap.add_argument("--factory", default=None, help="faiss factory string (default: an exact index)")
    ap.add_argument("--search", default="", help='faiss search parameters, e.g. "nprobe=16"')
    args = ap.parse_args(argv)
    n = args.n
    db, q = synthetic(n, args.queries, args.dim)
    if args.factory:
        idx = Index(args.dim, "faiss", {"factory": args.factory, "search": args.search}, device="cpu")
    else:
        idx = Index(args.dim, device="cpu")
    idx.add(db, [str(i) for i in range(n)])
    del db
    idx.search_vectors(q[:1], 1)  # trains / builds the search structure
    x = idx.store.vectors
    rng = np.random.default_rng(0)
    order = np.argsort(x[:, 0])
    pos = np.empty(n, np.int64)
    pos[order] = np.arange(n)
    nb = order[np.clip(pos[:, None] + rng.integers(-50, 51, (n, 50)), 0, n - 1)]
    sims = np.concatenate([np.einsum("nd,nkd->nk", x[s:s + 50000], x[nb[s:s + 50000]]) for s in range(0, n, 50000)])
    o = np.argsort(-sims, axis=1)
    idx.graph = KnnGraph(np.take_along_axis(idx.store.ids[nb], o, 1), np.take_along_axis(sims, o, 1).astype(np.float32),
                         exact=False)
    w = idx.affinity(50, 3.0, True)
    rr = Rerank(diffusion=PAPER)
    idx.search_rerank(q[:1], 100, rr)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(len(q)):
        idx.search_rerank(q[i:i + 1], 100, rr)
    print(json.dumps({"n": n, "dim": args.dim, "index": args.factory or "exact", "search": args.search,
                      "stand_in_edges": int(w.nnz), "cpu_ms_per_query": 1000 * (time.process_time() - cpu) / len(q),
                      "wall_ms_per_query": 1000 * (time.perf_counter() - wall) / len(q)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
