"""The HTTP service: search by upload (with crop box) and by id, additions, thumbnails, limits, safety."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.index import Index
from cbir.index.embed import QueryEncoder, model_settings

fastapi_testclient = pytest.importorskip("fastapi.testclient")

SOURCE = {"model": "efficientnet_lite0", "pooling": "gem", "weights": "default", "pooling_kw": {}}


def landmark(name: str) -> str:
    return name.split("_")[1]


@pytest.fixture(scope="module")
def lite0():
    from cbir.model import build_model

    return build_model("efficientnet_lite0", pooling="gem")


@pytest.fixture()
def paris(tmp_path, lite0, rparis250, rparis250_gnd, rparis250_lite0):
    """Index of the 238 rparis250 database photos from the cached Lite0-GeM 512 px descriptors, saved."""
    settings = model_settings(lite0, SOURCE, 512, (1.0,))
    idx = Index(lite0.dim, "exact", settings=settings, device="cpu")
    idx.add(rparis250_lite0["db"], [str(rparis250 / "jpg" / f"{n}.jpg") for n in rparis250_gnd["imlist"]])
    idx.save(tmp_path / "paris.index")
    return idx, tmp_path / "paris.index", QueryEncoder(settings, model=lite0, device="cpu")


def client_for(paris, **kw):
    from cbir.server import create_app

    idx, path, encoder = paris
    return fastapi_testclient.TestClient(create_app(idx, index_path=path, encoder=encoder, device="cpu", **kw))


def jpeg_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


@pytest.mark.slow
def test_upload_search_with_crop_box_matches_the_library(paris, rparis250, rparis250_gnd, rparis250_lite0):
    client = client_for(paris)
    qi = 1
    qname, g = rparis250_gnd["qimlist"][qi], rparis250_gnd["gnd"][qi]
    box = ",".join(str(v) for v in g["bbx"])
    r = client.post("/api/search", files={"file": ("q.jpg", jpeg_bytes(rparis250 / "jpg" / f"{qname}.jpg"), "image/jpeg")},
                    data={"bbox": box, "top": "10"})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    # the same ranking as the library on the cached query descriptor (same crop, size and model)
    want = paris[0].search(rparis250_lite0["q"][qi], 10)[0]
    assert [h["id"] for h in got[:5]] == [h.id for h in want[:5]]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], atol=2e-3)
    assert all(a["score"] >= b["score"] for a, b in zip(got, got[1:]))
    positives = {rparis250_gnd["imlist"][i] for i in g["easy"] + g["hard"]}
    assert Path(got[0]["name"]).stem in positives
    assert all(landmark(h["name"]) == landmark(qname) for h in got[:3])
    assert "path" not in got[0]  # server file system paths are not exposed


def test_search_by_id_and_metadata(paris, rparis250_gnd):
    client = client_for(paris)
    idx = paris[0]
    r = client.get("/api/search/7", params={"top": 5})
    assert r.status_code == 200
    res = r.json()["results"]
    assert len(res) == 5 and res[0]["id"] == 7 and res[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["id"] for h in res] == [h.id for h in idx.search(idx.vector(7), 5)[0]]
    info = client.get("/api/images/7").json()
    assert info["name"] == rparis250_gnd["imlist"][7] + ".jpg" and info["thumb"] == "/api/thumb/7"
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["images"] == 238 and h["dim"] == 1280 and h["model"] == "efficientnet_lite0"
    assert client.get("/api/search/100000").status_code == 404
    assert client.get("/api/search/7", params={"top": 0}).status_code == 400
    assert client.get("/api/search/7", params={"top": 10**6}).status_code == 400
    assert client.get("/api/search/abc").status_code == 422


def test_thumbnails_by_id_only(paris, rparis250, rparis250_gnd):
    client = client_for(paris)
    r = client.get("/api/thumb/3", params={"size": 128})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    with Image.open(rparis250 / "jpg" / f"{rparis250_gnd['imlist'][3]}.jpg") as orig:
        w, h = orig.size
    assert max(im.size) == 128 and abs(im.size[0] / im.size[1] - w / h) < 0.05
    assert client.get("/api/thumb/3", params={"size": 100000}).status_code == 400
    assert client.get("/api/thumb/99999").status_code == 404
    # no route takes a file name: traversal attempts never reach a file
    for url in ["/api/thumb/..%2F..%2Fetc%2Fpasswd", "/api/thumb/../../etc/passwd", "/api/thumb/%2e%2e/secret",
                "/static/../../etc/passwd", "/api/images/..%2Fmanifest.json", "/../manifest.json"]:
        r = client.get(url)
        assert r.status_code in (404, 422), (url, r.status_code)
        assert b"root:" not in r.content and b"cbir-index" not in r.content


def test_limits_and_content_types(paris, tmp_path):
    from cbir.server import Limits

    client = client_for(paris, limits=Limits(max_request_bytes=200_000, max_pixels=1_000_000))
    png = io.BytesIO()
    Image.new("RGB", (2000, 1000), (9, 9, 9)).save(png, "PNG")  # small file, 2 M pixels
    r = client.post("/api/search", files={"file": ("big.png", png.getvalue(), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    r = client.post("/api/search", files={"file": ("x.jpg", b"\xff" * 300_000, "image/jpeg")})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    r = client.post("/api/search", files={"file": ("x.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and "content type" in r.json()["detail"]
    r = client.post("/api/search", files={"file": ("x.jpg", b"not really a jpeg", "image/jpeg")})
    assert r.status_code == 415 and "not a readable image" in r.json()["detail"]
    r = client.post("/api/search", files={"file": ("x.jpg", b"", "image/jpeg")})
    assert r.status_code == 400
    small = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(small, "JPEG")
    for box in ["1,2,3", "a,b,c,d", "50,10,40,20", "100,100,200,200"]:
        r = client.post("/api/search", files={"file": ("s.jpg", small.getvalue(), "image/jpeg")}, data={"bbox": box})
        assert r.status_code == 400 and "bbox" in r.json()["detail"], (box, r.text)
    r = client.post("/api/search")
    assert r.status_code == 422


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_before_decoding(paris):
    client = client_for(paris)  # default limit: 40 M pixels
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")  # 144 M pixels in a few kB
    assert len(bomb.getvalue()) < 100_000
    r = client.post("/api/search", files={"file": ("bomb.png", bomb.getvalue(), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


def test_streamed_body_over_the_limit_is_refused(paris):
    from cbir.server import Limits

    client = client_for(paris, limits=Limits(max_request_bytes=10_000))

    def chunks():  # a well-formed multipart start, then more file bytes than allowed, without Content-Length
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        for _ in range(20):
            yield b"x" * 1000

    r = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


@pytest.mark.slow
def test_add_image_is_persisted(paris, rparis250, rparis250_gnd):
    idx, path, _ = paris
    client = client_for(paris)
    qname = rparis250_gnd["qimlist"][0]  # a query photo: not in the database yet
    data = jpeg_bytes(rparis250 / "jpg" / f"{qname}.jpg")
    r = client.post("/api/images", files={"file": ("q.jpg", data, "image/jpeg")})
    assert r.status_code == 201, r.text
    new_id = r.json()["id"]
    assert new_id == 238 and r.json()["images"] == 239
    # it is findable, its thumbnail works, and the saved index on disk has it
    res = client.get(f"/api/search/{new_id}", params={"top": 3}).json()["results"]
    assert res[0]["id"] == new_id
    assert client.get(f"/api/thumb/{new_id}").status_code == 200
    back = Index.load(path, device="cpu")
    assert len(back) == 239 and Path(back.get(new_id).path).parent == (path / "uploads").resolve()
    np.testing.assert_allclose(back.vector(new_id), idx.vector(new_id))
    # the same photo again is recognised, not duplicated
    r = client.post("/api/images", files={"file": ("again.jpg", data, "image/jpeg")})
    assert r.status_code == 200 and r.json() == {"id": new_id, "added": False, "detail": "this image is already in the index"}


def test_read_only_and_model_less_index(paris, tmp_path):
    from cbir.server import create_app

    client = client_for(paris, read_only=True)
    small = io.BytesIO()
    Image.new("RGB", (64, 48)).save(small, "JPEG")
    r = client.post("/api/images", files={"file": ("s.jpg", small.getvalue(), "image/jpeg")})
    assert r.status_code == 403
    bare = Index(4, "exact", device="cpu")
    bare.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    c2 = fastapi_testclient.TestClient(create_app(bare, read_only=True))
    r = c2.post("/api/search", files={"file": ("s.jpg", small.getvalue(), "image/jpeg")})
    assert r.status_code == 409 and "search by id" in r.json()["detail"]
    assert c2.get("/api/search/2", params={"top": 1}).json()["results"][0]["name"] == "c"


def test_page_is_self_contained(paris):
    client = client_for(paris)
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for element in ('id="file"', 'id="drop"', 'id="preview"', 'id="box"', 'id="results"', "/api/search"):
        assert element in html
    # no CDN or other external resource: every src/href is relative or a data/blob URL
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert "@import" not in html and "http://" not in html and "https://" not in html


def test_cbir_serve_command(tmp_path):
    """`cbir serve INDEX --port P` starts uvicorn with the page at / and the API under /api/."""
    import subprocess
    import sys
    import time

    import httpx

    from cbir.server.run import free_port

    idx = Index(4, "exact", device="cpu")
    idx.add(np.eye(4, dtype=np.float32), ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    idx.save(tmp_path / "ix")
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cbir", "serve", str(tmp_path / "ix"), "--port", str(port),
                             "--no-preload", "--read-only"], stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        assert health["images"] == 4 and health["read_only"] is True
        assert "cbir image search" in httpx.get(f"http://127.0.0.1:{port}/", timeout=60).text
        res = httpx.get(f"http://127.0.0.1:{port}/api/search/1", params={"top": 2}, timeout=60).json()["results"]
        assert res[0]["name"] == "b.jpg"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
