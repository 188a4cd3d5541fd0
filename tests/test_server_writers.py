"""One writer per index, no lost update (issue 9.3, service side): the service and the CLI share the
index's writer lock; the service serves generations written by others; duplicate uploads at once
give one image."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from cbir.index import Index

httpx = pytest.importorskip("httpx")


def photo(seed: int, size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def wait_for(get, done, seconds: float, every: float = 0.05):
    """``get()`` until ``done(value)``, at most ``seconds``; the last value (the caller asserts on it)."""
    import time

    deadline = time.monotonic() + seconds
    while not done(value := get()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def app_for(demo_index, **kw):
    from cbir.server import create_app

    idx, path, encoder = demo_index
    return create_app(idx, index_path=path, encoder=encoder, device="cpu", **kw)


@pytest.mark.slow
def test_cli_add_while_the_service_runs_then_an_upload_keeps_both(demo_index, demo, demo_gnd, tmp_path):
    """Before: the upload saved the service's stale copy over the CLI's generation (its photos lost, ids re-used)."""
    from cbir.server import BackgroundServer

    idx, path, _ = demo_index
    new = tmp_path / "new"
    new.mkdir()
    for name in demo_gnd["qimlist"][:2]:
        shutil.copy(demo / "jpg" / f"{name}.jpg", new / f"{name}.jpg")
    app = app_for(demo_index)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        assert http.get("/api/health").json()["images"] == 33
        r = subprocess.run([sys.executable, "-m", "cbir", "index", "add", str(path), str(new), "--device", "cpu"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        on_disk = Index.load(path, device="cpu")
        cli_ids = sorted(on_disk.id_of_path(str(f)) for f in sorted(new.iterdir()))
        assert len(on_disk) == 35 and None not in cli_ids
        r = http.post("/api/images", files={"file": ("mine.jpg", photo(1), "image/jpeg")})
        assert r.status_code == 201, r.text
        up_id = r.json()["id"]
        assert up_id not in cli_ids and r.json()["images"] == 36
        # the service serves the CLI's photos too (it noticed the new generation)
        assert http.get("/api/health").json()["images"] == 36
        for i, f in zip(cli_ids, sorted(new.iterdir())):
            assert http.get(f"/api/images/{i}").json()["name"] == f.name
            assert http.get(f"/api/search/{i}", params={"top": 1}).json()["results"][0]["id"] == i
    back = Index.load(path, device="cpu")
    assert len(back) == 36 and set(cli_ids) | {up_id} <= set(back.vectors()[0].tolist())
    assert len(set(back.vectors()[0].tolist())) == 36  # no id given twice


def test_concurrent_duplicate_uploads_give_one_image(demo_index):
    """Before: one 201 and 500s (SQLite UNIQUE) for the same photo uploaded by several clients at once."""
    from cbir.server import BackgroundServer

    n = 8
    idx, path, _ = demo_index
    data = photo(7)
    barrier = threading.Barrier(n)
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            barrier.wait()
            r = http.post("/api/images", files={"file": ("same.jpg", data, "image/jpeg")})
            with lock:
                results.append((r.status_code, r.json()))

    with BackgroundServer(app_for(demo_index)) as url:
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = httpx.get(url + "/api/health").json()
    codes = sorted(c for c, _ in results)
    assert codes == [200] * (n - 1) + [201], results
    ids = {body["id"] for _, body in results}
    assert len(ids) == 1
    assert all(body["added"] is False and "already" in body["detail"] for c, body in results if c == 200)
    assert health["images"] == 34
    assert len(Index.load(path, device="cpu")) == 34
    assert [p.name for p in (path / "uploads").iterdir()] == ["same.jpg"]


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from cbir.index import open_for_write
    path, k = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    for j in range(k):
        with open_for_write(path, device="cpu") as index:
            v = rng.standard_normal((1, index.dim)).astype(np.float32)
            index.add(v / np.linalg.norm(v), [f"/elsewhere/writer-{j}.jpg"])
""")


@pytest.mark.slow
def test_uploads_and_another_process_writing_at_once_lose_nothing(demo_index, tmp_path):
    """Uploads from 6 clients while another process adds 12 images one by one: all 18 present, ids unique."""
    from cbir.server import BackgroundServer

    idx, path, _ = demo_index
    k, clients = 12, 6
    failures: list[str] = []
    added: list[int] = []
    lock = threading.Lock()

    def client(url: str, c: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            r = http.post("/api/images", files={"file": (f"c{c}.jpg", photo(100 + c), "image/jpeg")})
            with lock:
                (added.append(r.json()["id"]) if r.status_code == 201 else failures.append(f"{r.status_code} {r.text}"))

    with BackgroundServer(app_for(demo_index)) as url:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(k)])
        threads = [threading.Thread(target=client, args=(url, c)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert writer.wait(timeout=300) == 0
        # the service notices the writer's last generation at its next look at the manifest (every 0.5 s)
        health = wait_for(lambda: httpx.get(url + "/api/health").json(),
                          lambda h: h["images"] == 33 + k + clients, seconds=30)
    assert not failures, failures
    back = Index.load(path, device="cpu")
    ids = back.vectors()[0].tolist()
    assert len(back) == 33 + k + clients == health["images"]
    assert len(set(ids)) == len(ids) and set(added) <= set(ids)
    assert all(back.id_of_path(f"/elsewhere/writer-{j}.jpg") is not None for j in range(k))
