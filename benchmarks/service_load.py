"""Latency of the search service under concurrent clients, as ratios to the same requests unloaded.

A uvicorn server (cbir.server.BackgroundServer, in this process) over an exact index of --n
clustered unit descriptors (the first ones the bundled demo photos), Lite0-GeM at --imsize px for
uploads. Two runs of the same request mix: first one client sending them one after another (the
unloaded baseline), then --clients clients at once, each with its share (--id-searches searches by
id each; --uploads of the clients also search with an uploaded demo photo). Printed: p50/p95
latency per kind in both runs, the ratio loaded p95 / unloaded p50, and the throughput ratio
(requests/s at once / one after another). Every request must succeed with the right first result.

    python benchmarks/service_load.py                         # 50 clients, 20,000 x 1280, CPU
    python benchmarks/service_load.py --clients 100 --n 100000 --json load.json

Timings on a shared machine move with its load; the ratios compare runs made a few seconds apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(seconds)
    return {"n": int(ms.size), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def build_app(n: int, imsize: int, tmp: Path):
    """The app over n clustered descriptors (unit length; the first ones are the demo photos) and the photos."""
    from cbir.index import Index
    from cbir.index.embed import QueryEncoder, model_settings
    from cbir.model import build_model
    from cbir.server import create_app

    photos = sorted(DEMO.glob("*.jpg"))
    model = build_model("efficientnet_lite0", pooling="gem")
    source = {"model": "efficientnet_lite0", "pooling": "gem", "weights": "default", "pooling_kw": {}}
    settings = model_settings(model, source, imsize, (1.0,))
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, model.dim)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.5 * rng.standard_normal((n, model.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths = [str(p) for p in photos] + [f"/synthetic/{i}.jpg" for i in range(n - len(photos))]
    idx = Index(model.dim, "exact", settings=settings, device="cpu")
    idx.add(x, paths)
    app = create_app(idx, index_path=tmp / "ix", encoder=QueryEncoder(settings, model=model, device="cpu"),
                     device="cpu", read_only=True)
    return app, photos


def jobs_for(clients: int, id_searches: int, uploads: int, n: int, photos: list[Path]) -> list[list[tuple[str, object]]]:
    """Each client's requests: ("id", image id) x id_searches, plus one ("upload", photo) for the first ``uploads``."""
    ids = np.random.default_rng(1).integers(0, n, (clients, id_searches))
    out = []
    for c in range(clients):
        jobs: list[tuple[str, object]] = [("id", int(i)) for i in ids[c]]
        if c < uploads:
            jobs.insert(c % 2, ("upload", photos[c % len(photos)]))
        out.append(jobs)
    return out


def run(url: str, per_client: list[list[tuple[str, object]]], at_once: bool) -> tuple[dict, list[str], float]:
    """Latencies by kind, failures and wall seconds: every client's jobs at once, or all in a row by one client."""
    import httpx

    lat: dict[str, list[float]] = {"id": [], "upload": []}
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(per_client) if at_once else 1)

    def client(jobs: list[tuple[str, object]]) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            barrier.wait()
            for kind, arg in jobs:
                t0 = time.perf_counter()
                try:
                    if kind == "id":
                        r = http.get(f"/api/search/{arg}", params={"top": 20})
                        ok = r.status_code == 200 and r.json()["results"][0]["id"] == arg
                    else:
                        r = http.post("/api/search", files={"file": (arg.name, arg.read_bytes(), "image/jpeg")},
                                      data={"top": "20"})
                        ok = r.status_code == 200 and len(r.json()["results"]) == 20
                except Exception as exc:  # a refused or dropped connection is a failure
                    ok, r = False, exc
                dt = time.perf_counter() - t0
                with lock:
                    lat[kind].append(dt)
                    if not ok:
                        failures.append(f"{kind} {arg}: {getattr(r, 'status_code', r)}")

    t0 = time.perf_counter()
    if at_once:
        threads = [threading.Thread(target=client, args=(jobs,)) for jobs in per_client]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        client([job for jobs in per_client for job in jobs])
    return lat, failures, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--n", type=int, default=20000, help="indexed descriptors")
    ap.add_argument("--id-searches", type=int, default=4, help="searches by id per client")
    ap.add_argument("--uploads", type=int, default=10, help="clients that also search with an uploaded photo")
    ap.add_argument("--imsize", type=int, default=256, help="upload description size (px)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import tempfile

    from cbir.server import BackgroundServer

    with tempfile.TemporaryDirectory() as tmp:
        app, photos = build_app(args.n, args.imsize, Path(tmp))
        per_client = jobs_for(args.clients, args.id_searches, args.uploads, args.n, photos)
        total = sum(len(j) for j in per_client)
        with BackgroundServer(app) as url:
            run(url, per_client[:2], at_once=False)  # warm: model, caches, threads
            serial, fail_s, wall_s = run(url, per_client, at_once=False)
            loaded, fail_c, wall_c = run(url, per_client, at_once=True)
    result = {"clients": args.clients, "requests": total, "n": args.n, "imsize": args.imsize,
              "machine": f"{platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
              "one_client": {k: percentiles(v) for k, v in serial.items()} | {"wall_s": wall_s},
              "at_once": {k: percentiles(v) for k, v in loaded.items()} | {"wall_s": wall_c},
              "throughput_ratio": wall_s / wall_c, "failures": fail_s + fail_c}
    print(f"{total} requests ({args.clients} clients), exact index {args.n:,} x 1280 on CPU, uploads at "
          f"{args.imsize} px; {result['machine']}")
    print(f"{'':14} {'one client p50/p95 ms':>24} {'at once p50/p95 ms':>22} {'p95 at once / p50 alone':>25}")
    for kind in ("id", "upload"):
        a, b = result["one_client"][kind], result["at_once"][kind]
        print(f"{kind + ' search':14} {a['p50_ms']:>11.1f} / {a['p95_ms']:<10.1f} {b['p50_ms']:>9.1f} / "
              f"{b['p95_ms']:<10.1f} {b['p95_ms'] / a['p50_ms']:>16.1f}x")
    print(f"wall: one client {wall_s:.1f} s, at once {wall_c:.1f} s (throughput ratio {wall_s / wall_c:.2f}); "
          f"{len(result['failures'])} failed")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
