"""Load on loopback: 50 clients at once against a real uvicorn server (benchmarks/service_load.py).

The benchmark runs the same 210 requests (200 searches by id in a 10,000 x 1280 exact index, 10
upload searches) twice, one client after another and 50 clients at once, in the same process a
few seconds apart. Asserted, as ratios between the two runs (the machine is shared, absolute
times are not): every request succeeds with the right first result; all at once take at most
2.5 x the wall time of one client doing them in a row (no collapse under concurrency: lock convoys,
thread explosions); and no kind of request waits at p95 longer than the whole batch takes in a row
(no starvation of one kind behind the other).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "service_load.py"


@pytest.mark.slow
def test_fifty_clients_at_once(tmp_path):
    pytest.importorskip("httpx")
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, str(BENCH), "--clients", "50", "--n", "10000", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["failures"] == [] and res["requests"] == 50 * 4 + 10
    assert res["one_client"]["id"]["n"] == res["at_once"]["id"]["n"] == 200
    assert res["one_client"]["upload"]["n"] == res["at_once"]["upload"]["n"] == 10
    assert res["throughput_ratio"] >= 0.4, r.stdout
    for kind in ("id", "upload"):
        assert res["at_once"][kind]["p95_ms"] <= 1000 * res["one_client"]["wall_s"], r.stdout
