"""The HTTP service on the bundled demo set: search by upload (with crop box) and by id, additions,
removals, thumbnails, limits, odd ids, file names and permissions of stored uploads."""

from __future__ import annotations

import io
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.index import Index

fastapi_testclient = pytest.importorskip("fastapi.testclient")
BASE = "http://127.0.0.1"  # the Host a local browser sends; "testserver" is not an allowed host


def landmark(name: str) -> str:
    return name.split("_")[1]


def client_for(demo_index, **kw):
    from cbir.server import create_app

    idx, path, encoder = demo_index
    return fastapi_testclient.TestClient(create_app(idx, index_path=path, encoder=encoder, device="cpu", **kw),
                                         base_url=BASE)


def photo(seed: int, size=(96, 72), fmt="JPEG") -> bytes:
    """A small random photo (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_upload_search_with_crop_box_matches_the_library(demo_index, demo, demo_gnd, demo_lite0):
    client = client_for(demo_index)
    for qi in range(len(demo_gnd["qimlist"])):
        qname, g = demo_gnd["qimlist"][qi], demo_gnd["gnd"][qi]
        box = ",".join(str(v) for v in g["bbx"])
        r = client.post("/api/search", files={"file": ("q.jpg", (demo / "jpg" / f"{qname}.jpg").read_bytes(),
                                                        "image/jpeg")}, data={"bbox": box, "top": "10"})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        # the same ranking as the library on the cached query descriptor (same crop, size and model)
        want = demo_index[0].search(demo_lite0["q"][qi], 10)[0]
        assert [h["id"] for h in got[:5]] == [h.id for h in want[:5]]
        np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], atol=2e-3)
        assert all(a["score"] >= b["score"] for a, b in zip(got, got[1:]))
        positives = {demo_gnd["imlist"][i] for i in g["easy"] + g["hard"]}
        assert Path(got[0]["name"]).stem in positives
        assert landmark(got[0]["name"]) == landmark(qname)
        assert "path" not in got[0]  # server file system paths are not exposed


def test_query_images_are_described_in_memory(demo_index, demo, demo_gnd, monkeypatch):
    """No temporary file per query: the upload is decoded from memory (10.7)."""
    import tempfile

    def no_temp_files(*a, **k):
        raise AssertionError("a temporary file was made for a query")

    for name in ("mkstemp", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, no_temp_files)
    client = client_for(demo_index)
    q = demo / "jpg" / f"{demo_gnd['qimlist'][2]}.jpg"
    r = client.post("/api/search", files={"file": ("q.jpg", q.read_bytes(), "image/jpeg")}, data={"top": "3"})
    assert r.status_code == 200, r.text
    assert landmark(r.json()["results"][0]["name"]) == landmark(q.name)


def test_search_by_id_and_metadata(demo_index, demo_gnd):
    client = client_for(demo_index)
    idx = demo_index[0]
    r = client.get("/api/search/7", params={"top": 5})
    assert r.status_code == 200
    res = r.json()["results"]
    assert len(res) == 5 and res[0]["id"] == 7 and res[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["id"] for h in res] == [h.id for h in idx.search(idx.vector(7), 5)[0]]
    info = client.get("/api/images/7").json()
    assert info["name"] == demo_gnd["imlist"][7] + ".jpg" and info["thumb"] == "/api/thumb/7"
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["images"] == 33 and h["dim"] == 1280 and h["model"] == "efficientnet_lite0"
    assert h["writes_need_token"] is False
    assert client.get("/api/search/100000").status_code == 404
    assert client.get("/api/search/7", params={"top": 0}).status_code == 400
    assert client.get("/api/search/7", params={"top": 10**6}).status_code == 400
    assert client.get("/api/search/7", params={"top": 10**30}).status_code == 400
    assert client.get("/api/search/abc").status_code == 422


@pytest.mark.parametrize("url", ["/api/images/{}", "/api/thumb/{}", "/api/search/{}"])
@pytest.mark.parametrize("bad", ["9223372036854775808", str(10**30), "-1", "-9223372036854775809", "1e3", "nan"])
def test_ids_beyond_int64_are_4xx(demo_index, url, bad):
    """Ids outside int64 (or not integers) are refused before the index is asked (9.5: they gave 500)."""
    client = client_for(demo_index)
    r = client.get(url.format(bad))
    assert r.status_code in (404, 422), (url, bad, r.status_code, r.text)
    assert client.get(url.format(2**63 - 1)).status_code == 404  # the largest int64 is an id, just not indexed


def test_thumbnails_by_id_only(demo_index, demo, demo_gnd):
    client = client_for(demo_index)
    r = client.get("/api/thumb/3", params={"size": 128})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    with Image.open(demo / "jpg" / f"{demo_gnd['imlist'][3]}.jpg") as orig:
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


def test_limits_and_content_types(demo_index):
    from cbir.server import Limits

    client = client_for(demo_index, limits=Limits(max_request_bytes=200_000, max_pixels=1_000_000))
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
    small = photo(0, (64, 48))
    for box in ["1,2,3", "a,b,c,d", "50,10,40,20", "100,100,200,200", "nan,nan,nan,nan", "0,0,inf,nan", "-inf,0,inf,48",
                "-inf,0,10,10,"]:
        r = client.post("/api/search", files={"file": ("s.jpg", small, "image/jpeg")}, data={"bbox": box})
        assert r.status_code == 400 and "bbox" in r.json()["detail"], (box, r.text)
    r = client.post("/api/search", files={"file": ("s.jpg", small, "image/jpeg")}, data={"bbox": "-5,0,1000,48"})
    assert r.status_code == 200, r.text  # sides outside the image are clamped to it
    r = client.post("/api/search")
    assert r.status_code == 422


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_before_decoding(demo_index):
    client = client_for(demo_index)  # default limit: 40 M pixels
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")  # 144 M pixels in a few kB
    assert len(bomb.getvalue()) < 100_000
    r = client.post("/api/search", files={"file": ("bomb.png", bomb.getvalue(), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


def test_streamed_body_over_the_limit_is_refused(demo_index):
    from cbir.server import Limits

    client = client_for(demo_index, limits=Limits(max_request_bytes=10_000))

    def chunks():  # a well-formed multipart start, then more file bytes than allowed, without Content-Length
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        for _ in range(20):
            yield b"x" * 1000

    r = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


def test_add_image_is_persisted_under_its_own_name(demo_index, demo, demo_gnd):
    idx, path, _ = demo_index
    client = client_for(demo_index)
    qname = demo_gnd["qimlist"][0]  # a query photo: not in the database yet
    data = (demo / "jpg" / f"{qname}.jpg").read_bytes()
    r = client.post("/api/images", files={"file": (f"{qname}.jpg", data, "image/jpeg")})
    assert r.status_code == 201, r.text
    new_id = r.json()["id"]
    assert new_id == 33 and r.json()["images"] == 34 and r.json()["name"] == f"{qname}.jpg"
    # it is findable, its thumbnail works, and the saved index on disk has it
    res = client.get(f"/api/search/{new_id}", params={"top": 3}).json()["results"]
    assert res[0]["id"] == new_id and res[0]["name"] == f"{qname}.jpg"
    assert client.get(f"/api/thumb/{new_id}").status_code == 200
    back = Index.load(path, device="cpu")
    assert len(back) == 34 and Path(back.get(new_id).path) == (path / "uploads" / f"{qname}.jpg").resolve()
    np.testing.assert_allclose(back.vector(new_id), idx.vector(new_id))
    # the same photo again, under any name, is recognised, not duplicated
    r = client.post("/api/images", files={"file": ("again.jpg", data, "image/jpeg")})
    assert r.status_code == 200
    assert r.json() == {"id": new_id, "added": False, "detail": "this image is already in the index"}
    assert sorted(p.name for p in (path / "uploads").iterdir()) == [f"{qname}.jpg"]


def test_uploaded_names_are_made_safe_and_never_collide(demo_index):
    from cbir.server.uploads import safe_name

    assert safe_name("../../etc/passwd", ".jpg") == "passwd.jpg"
    assert safe_name("..\\..\\Windows\\evil.exe.png", ".png") == "evil.exe.png"
    assert safe_name("Tour Eiffel (été) #1.JPG", ".jpg") == "Tour_Eiffel_ete_1.jpg"
    assert safe_name(".htaccess", ".jpg") == "htaccess.jpg"
    assert safe_name("", ".jpg") == safe_name(None, ".jpg") == safe_name("...", ".jpg") == "upload.jpg"
    assert safe_name("a" * 300 + ".jpg", ".jpg") == "a" * 80 + ".jpg"
    # the suffix is the format the bytes have, not what the name claims
    assert safe_name("photo.png", ".jpg") == "photo.jpg"

    idx, path, _ = demo_index
    client = client_for(demo_index)
    names = []
    for seed, name in enumerate(["../../x/holiday.jpg", "holiday.jpg", "holiday.png", "<script>.jpg"]):
        r = client.post("/api/images", files={"file": (name, photo(seed), "image/jpeg")})
        assert r.status_code == 201, r.text
        names.append(r.json()["name"])
    assert names[0] == "holiday.jpg" and names[3] == "script.jpg"
    assert re.fullmatch(r"holiday-[0-9a-f]{8}\.jpg", names[1]) and re.fullmatch(r"holiday-[0-9a-f]{8}\.jpg", names[2])
    assert len(set(names)) == 4
    assert sorted(p.name for p in (path / "uploads").iterdir()) == sorted(names)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_stored_uploads_follow_the_umask(demo_index, umask):
    """9.6: an upload is as readable as any file the user writes (0644 under umask 022), not always 0600."""
    idx, path, _ = demo_index
    client = client_for(demo_index)
    old = os.umask(umask)
    try:
        r = client.post("/api/images", files={"file": ("p.jpg", photo(umask), "image/jpeg")})
    finally:
        os.umask(old)
    assert r.status_code == 201, r.text
    mode = stat.S_IMODE((path / "uploads" / r.json()["name"]).stat().st_mode)
    assert mode == 0o666 & ~umask, oct(mode)


def test_remove_image_matches_cbir_index_remove(demo_index, demo, demo_gnd):
    idx, path, _ = demo_index
    client = client_for(demo_index)
    r = client.post("/api/images", files={"file": ("mine.jpg", photo(5), "image/jpeg")})
    up_id = r.json()["id"]
    assert (path / "uploads" / "mine.jpg").is_file()
    r = client.delete(f"/api/images/{up_id}")
    assert r.status_code == 200 and r.json() == {"id": up_id, "removed": True, "images": 33}
    assert not (path / "uploads" / "mine.jpg").exists()  # a photo the service stored is deleted with it
    r = client.delete("/api/images/4")  # a photo of the collection: removed from the index, the file is kept
    assert r.status_code == 200 and r.json()["images"] == 32
    assert (demo / "jpg" / f"{demo_gnd['imlist'][4]}.jpg").is_file()
    assert client.delete("/api/images/4").status_code == 404
    assert client.get("/api/images/4").status_code == 404
    assert 4 not in [h["id"] for h in client.get("/api/search/5", params={"top": 50}).json()["results"]]
    back = Index.load(path, device="cpu")
    assert len(back) == 32 and back.id_of_path(str(demo / "jpg" / f"{demo_gnd['imlist'][4]}.jpg")) is None
    # ids are never re-used after a removal
    r = client.post("/api/images", files={"file": ("next.jpg", photo(6), "image/jpeg")})
    assert r.json()["id"] == up_id + 1


def test_read_only_and_model_less_index(demo_index):
    from cbir.server import create_app

    client = client_for(demo_index, read_only=True)
    small = photo(1, (64, 48))
    r = client.post("/api/images", files={"file": ("s.jpg", small, "image/jpeg")})
    assert r.status_code == 403
    assert client.delete("/api/images/1").status_code == 403
    bare = Index(4, "exact", device="cpu")
    bare.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    c2 = fastapi_testclient.TestClient(create_app(bare, read_only=True), base_url=BASE)
    r = c2.post("/api/search", files={"file": ("s.jpg", small, "image/jpeg")})
    assert r.status_code == 409 and "search by id" in r.json()["detail"]
    assert c2.get("/api/search/2", params={"top": 1}).json()["results"][0]["name"] == "c"


def test_page_is_self_contained_with_a_favicon(demo_index):
    client = client_for(demo_index)
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for element in ('id="file"', 'id="drop"', 'id="preview"', 'id="box"', 'id="results"', "/api/search"):
        assert element in html
    # no CDN or other external resource: every src/href is relative or a data/blob URL
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert "@import" not in html and "http://" not in html and "https://" not in html
    icon = re.search(r'<link rel="icon"[^>]*href="([^"]+)"', html).group(1)
    for url in (icon, "/favicon.ico"):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content


def _serve(tmp_path, *args, env=None):
    import subprocess
    import sys

    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cbir", "serve", *args], stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=env)
    return proc, log


def test_cbir_serve_command(tmp_path):
    """`cbir serve INDEX --port P` starts uvicorn with the page at / and the API under /api/."""
    import time

    import httpx

    from cbir.server.run import free_port

    idx = Index(4, "exact", device="cpu")
    idx.add(np.eye(4, dtype=np.float32), ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    idx.save(tmp_path / "ix")
    port = free_port()
    proc, log = _serve(tmp_path, str(tmp_path / "ix"), "--port", str(port), "--no-preload", "--read-only")
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
        # a second server on the same port: one clear line, exit 2, and no "serving on" before it
        import subprocess
        import sys

        second = subprocess.run([sys.executable, "-m", "cbir", "serve", str(tmp_path / "ix"), "--port", str(port),
                                 "--no-preload", "--read-only"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "serving on" not in second.stderr and "Traceback" not in second.stderr
        assert f"port {port}" in second.stderr and "in use" in second.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("size, box", [((1, 1), None), ((3000, 2), None), ((2, 3000), None), ((64, 48), "0,0,64,1"),
                                       ((64, 48), "0,0,1,48"), ((64, 48), "10,10,11,11")])
def test_odd_but_valid_images_are_described(tmp_path, lite0_gem, demo_lite0, size, box):
    """9.2, service side: a 1x1 photo, a 3000x2 strip, a 1-pixel crop box are searched and added at 3 scales
    (the 0.5 scale of a 1-pixel side was a 0-pixel tensor: 500)."""
    from conftest import LITE0_SOURCE

    from cbir.index.embed import QueryEncoder, model_settings
    from cbir.server import create_app

    settings = model_settings(lite0_gem, LITE0_SOURCE, 512, (1.0, 0.7071, 0.5))
    idx = Index(lite0_gem.dim, "exact", settings=settings, device="cpu")
    idx.add(demo_lite0["db"], [f"/demo/{i}.jpg" for i in range(len(demo_lite0["db"]))])
    idx.save(tmp_path / "ix")
    client = fastapi_testclient.TestClient(create_app(idx, index_path=tmp_path / "ix", device="cpu",
                                                      encoder=QueryEncoder(settings, model=lite0_gem, device="cpu")),
                                           base_url=BASE)
    data = photo(sum(size), size)
    r = client.post("/api/search", files={"file": ("odd.jpg", data, "image/jpeg")}, data={"bbox": box} if box else {})
    assert r.status_code == 200 and len(r.json()["results"]) == 20, r.text
    if box is None:
        r = client.post("/api/images", files={"file": ("odd.jpg", data, "image/jpeg")})
        assert r.status_code == 201, r.text
