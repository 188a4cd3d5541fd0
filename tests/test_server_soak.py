"""Soak: `cbir serve` under 30 clients for a while must not keep growing its memory (issue 19.6).

The service runs in its own process (the demo index, Lite0-GeM 512 px, the model rebuilt by
`cbir serve` as a user would run it). After a warm-up (one client searches with every demo photo,
by every id, and loads every thumbnail: the model, the encoder's buffers for each image size and
the caches exist; then the 30 clients run for WARM_S seconds, so that 30 requests in flight at once
have had their buffers once), its resident memory (VmRSS of /proc/PID/status) is read; then the 30
clients search for SOAK_S seconds more and it is read again: more than 10 % growth is a leak and fails.
With only the one-client warm-up, the first seconds of 30 clients measured +10.1 % on CI (their
uploads and results in flight, held once, not growing).

Before the fix, the encoder ran on whichever of uvicorn's ~40 request threads took the request,
and glibc's per-thread malloc arenas kept what each thread had freed: this test measured
1119 -> 1941 MB (+73 %); with every query encoded on the service's one encoding thread,
1114 -> 1138 MB (+2 %) (loaded 2-core machine).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

CLIENTS, WARM_S, SOAK_S, MAX_GROWTH = 30, 5.0, 20.0, 0.10


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (VmRSS of /proc/PID/status; Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc (Linux)")
def test_rss_does_not_grow_under_load(demo_index, demo, demo_gnd, tmp_path):
    from cbir.server.run import free_port

    _, path, _ = demo_index
    photos = [(demo / "jpg" / f"{n}.jpg").read_bytes() for n in demo_gnd["imlist"] + demo_gnd["qimlist"]]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cbir", "serve", str(path), "--port", str(port), "--read-only",
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()

    def request(http: httpx.Client, kind: str, j: int) -> None:
        if kind == "upload":
            r = http.post("/api/search", files={"file": ("q.jpg", photos[j % len(photos)], "image/jpeg")},
                          data={"top": "20"})
        elif kind == "id":
            r = http.get(f"/api/search/{j % 33}", params={"top": 20})
        else:
            r = http.get(f"/api/thumb/{j % 33}", params={"size": 256})
        with lock:
            done[0] += 1
            if r.status_code != 200:
                failures.append(f"{r.request.url}: {r.status_code} {r.text[:200]}")

    def client(c: int, until: float) -> None:
        """Upload, upload, id, thumbnail, ... until ``until``; client c starts at photo 7c."""
        with httpx.Client(base_url=url, timeout=120) as http:
            i = 0
            while time.monotonic() < until:
                request(http, ("upload", "upload", "id", "thumb")[i % 4], 7 * c + i)
                i += 1

    def run_clients(seconds: float) -> None:
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=client, args=(c, until)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).json()["model_loaded"]:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=120) as http:  # one client: every photo, id and thumbnail once
            for j in range(len(photos)):
                request(http, "upload", j)
            for j in range(33):
                request(http, "id", j)
                request(http, "thumb", j)
        assert done[0] == len(photos) + 2 * 33
        run_clients(WARM_S)  # the concurrent warm-up: 30 requests in flight at once, their buffers once
        warm = rss_mb(proc.pid)
        warm_requests = done[0]
        run_clients(SOAK_S)
        after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    assert not failures, failures[:5]
    assert done[0] > warm_requests + CLIENTS
    growth = after / warm - 1
    print(f"\nsoak: {CLIENTS} clients, {done[0] - warm_requests} requests in {SOAK_S:g} s after "
          f"{warm_requests} warm-up requests; RSS {warm:.0f} -> {after:.0f} MB ({100 * growth:+.1f} %)")
    assert growth <= MAX_GROWTH, f"RSS grew {100 * growth:.1f} % under load ({warm:.0f} -> {after:.0f} MB)"
