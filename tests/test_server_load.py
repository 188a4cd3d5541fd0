"""Load on loopback: 50 concurrent clients against a real uvicorn server; no request may fail."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cbir.index import Index
from cbir.index.embed import QueryEncoder, model_settings

httpx = pytest.importorskip("httpx")

CLIENTS, ID_SEARCHES_EACH, UPLOADS = 50, 4, 10
DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


@pytest.mark.slow
def test_fifty_concurrent_clients(tmp_path):
    from cbir.model import build_model
    from cbir.server import BackgroundServer, create_app

    photos = sorted(DEMO.glob("*.jpg"))
    if not photos:
        pytest.skip(f"bundled demo photos not found in {DEMO}")
    lite0 = build_model("efficientnet_lite0", pooling="gem")
    source = {"model": "efficientnet_lite0", "pooling": "gem", "weights": "default", "pooling_kw": {}}
    settings = model_settings(lite0, source, 256, (1.0,))
    # 20,000 indexed descriptors (clustered, unit length); the first ones are the demo photos
    rng = np.random.default_rng(0)
    n = 20000
    centres = rng.standard_normal((200, lite0.dim)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.5 * rng.standard_normal((n, lite0.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths = [str(p) for p in photos] + [f"/synthetic/{i}.jpg" for i in range(n - len(photos))]
    idx = Index(lite0.dim, "exact", settings=settings, device="cpu")
    idx.add(x, paths)
    app = create_app(idx, index_path=tmp_path / "ix", encoder=QueryEncoder(settings, model=lite0, device="cpu"),
                     device="cpu")

    lat_id: list[float] = []
    lat_up: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)

    def client(c: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            barrier.wait()
            jobs = [("id", int(rng_ids[c, j])) for j in range(ID_SEARCHES_EACH)]
            if c < UPLOADS:
                jobs.insert(c % 2, ("upload", photos[c % len(photos)]))
            for kind, arg in jobs:
                t0 = time.perf_counter()
                try:
                    if kind == "id":
                        r = http.get(f"/api/search/{arg}", params={"top": 20})
                    else:
                        r = http.post("/api/search", files={"file": (arg.name, arg.read_bytes(), "image/jpeg")},
                                      data={"top": "20"})
                    ok = r.status_code == 200 and len(r.json()["results"]) == 20
                    if kind == "id":
                        ok = ok and r.json()["results"][0]["id"] == arg
                except Exception as exc:  # a refused or dropped connection counts as a failure
                    ok, r = False, exc
                ms = 1000 * (time.perf_counter() - t0)
                with lock:
                    (lat_id if kind == "id" else lat_up).append(ms)
                    if not ok:
                        failures.append(f"{kind} {arg}: {getattr(r, 'status_code', r)}")

    rng_ids = np.random.default_rng(1).integers(0, n, (CLIENTS, ID_SEARCHES_EACH))
    with BackgroundServer(app) as url:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c, url)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    total = len(lat_id) + len(lat_up)
    assert total == CLIENTS * ID_SEARCHES_EACH + UPLOADS
    assert not failures, failures[:5]
    p50, p95 = percentiles(lat_id)
    u50, u95 = percentiles(lat_up)
    print(f"\nload: {CLIENTS} concurrent clients, {total} searches in {wall:.1f} s ({total / wall:.1f}/s), 0 failed; "
          f"index 20,000 x {lite0.dim} exact (CPU)")
    print(f"  search by id  ({len(lat_id)}): p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    print(f"  upload search ({len(lat_up)}, Lite0-GeM 256 px): p50 {u50:.1f} ms, p95 {u95:.1f} ms")
