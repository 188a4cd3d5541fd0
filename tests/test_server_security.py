"""The guarded write API (issue 9.4): Host allow-list, write token, Origin check, store budget, start-up refusals."""

from __future__ import annotations

import io
import subprocess
import sys
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

fastapi_testclient = pytest.importorskip("fastapi.testclient")
TOKEN = "s3cret-token-for-the-tests-0123"


def photo(seed: int, size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def client_for(demo_index, base="http://127.0.0.1:8000", **kw):
    from cbir.server import create_app

    idx, path, encoder = demo_index
    return fastapi_testclient.TestClient(create_app(idx, index_path=path, encoder=encoder, device="cpu", **kw),
                                         base_url=base)


def upload(client, seed=0, **headers):
    return client.post("/api/images", files={"file": (f"p{seed}.jpg", photo(seed), "image/jpeg")}, headers=headers)


def test_host_allow_list(demo_index):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends Host: evil.example -> 400."""
    from cbir.server import Guard

    client = client_for(demo_index)
    for host in ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.1"]:
        assert client.get("/api/health", headers={"host": host}).status_code == 200, host
    for host in ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "", "localhost.:8000", "[::2]:80"]:
        for url in ["/api/health", "/", "/api/thumb/1", "/api/images/1"]:
            r = client.get(url, headers={"host": host})
            assert r.status_code == 400 and "not allowed" in r.json()["detail"], (host, url, r.status_code)
        assert upload(client, 0, host=host).status_code == 400
    # --allowed-host adds names; the bound address counts; '*' allows any
    g = Guard.for_bind("192.168.1.5", token=TOKEN, allowed_hosts=["photos.lan"])
    assert g.host_allowed("photos.lan:8000") and g.host_allowed("192.168.1.5:8000") and g.host_allowed("localhost")
    assert not g.host_allowed("evil.example") and not g.host_allowed(None)
    assert not Guard.for_bind("0.0.0.0").host_allowed("0.0.0.0:8000")
    assert Guard.for_bind("0.0.0.0", allowed_hosts=["*"]).host_allowed("anything:1")
    c2 = client_for(demo_index, base="http://photos.lan", guard=Guard.for_bind("127.0.0.1", allowed_hosts=["photos.lan"]))
    assert c2.get("/api/health").status_code == 200


def test_writes_from_another_origin_are_refused(demo_index):
    """CSRF: a form on another site posting to the service -> 403; the page itself (same origin) may write."""
    client = client_for(demo_index)
    for headers in [{"origin": "http://evil.example"}, {"origin": "null"}, {"origin": "http://127.0.0.1:9999"},
                    {"origin": "https://127.0.0.1:8000.evil.example"}, {"origin": "not a url"},
                    {"sec-fetch-site": "cross-site"}]:
        r = upload(client, 1, **headers)
        assert r.status_code == 403 and "write refused" in r.json()["detail"], (headers, r.status_code)
        r = client.delete("/api/images/1", headers=headers)
        assert r.status_code == 403, headers
    assert client.get("/api/images/1").status_code == 200  # nothing was removed
    # reads stay open to any origin (they change nothing); the page's own origin and no Origin may write
    assert client.get("/api/search/1", headers={"origin": "http://evil.example"}).status_code == 200
    assert upload(client, 2, origin="http://127.0.0.1:8000", **{"sec-fetch-site": "same-origin"}).status_code == 201
    assert upload(client, 3).status_code == 201


def test_write_token(demo_index):
    from cbir.server import Guard

    client = client_for(demo_index, guard=Guard.for_bind("127.0.0.1", token=TOKEN))
    assert client.get("/api/health").json()["writes_need_token"] is True
    assert upload(client, 1).status_code == 401
    r = upload(client, 1, authorization="Bearer wrong-token-wrong-token")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert upload(client, 1, authorization=TOKEN).status_code == 401  # no scheme
    assert client.delete("/api/images/1").status_code == 401
    r = upload(client, 1, authorization=f"Bearer {TOKEN}")
    assert r.status_code == 201
    assert client.delete(f"/api/images/{r.json()['id']}", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    # the token does not excuse a foreign origin
    assert upload(client, 2, authorization=f"Bearer {TOKEN}", origin="http://evil.example").status_code == 403
    # reads need no token
    assert client.get("/api/search/1").status_code == 200
    assert client.get("/api/thumb/1").status_code == 200


def test_read_token(tmp_path):
    from cbir.server import ConfigError
    from cbir.server.security import read_token

    f = tmp_path / "token"
    f.write_text(TOKEN + "\nignored\n")
    assert read_token(f, {}) == TOKEN
    assert read_token(None, {"CBIR_TOKEN": " " + TOKEN + " "}) == TOKEN
    assert read_token(None, {}) is None
    assert read_token(f, {"CBIR_TOKEN": "other-token-other-token"}) == TOKEN  # the file wins
    f.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(f, {})
    f.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_token(f, {})
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(tmp_path / "missing", {})


def test_check_bind_refuses_open_writes_off_loopback():
    from cbir.server import ConfigError
    from cbir.server.security import check_bind, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("127.3.4.5") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("::")
    check_bind("127.0.0.1", None, False)
    check_bind("0.0.0.0", TOKEN, False)
    check_bind("0.0.0.0", None, True)  # read-only: nothing to protect
    for host in ["0.0.0.0", "::", "192.168.1.5", "example.org"]:
        with pytest.raises(ConfigError, match="without a write token"):
            check_bind(host, None, False)


def test_cbir_serve_refuses_to_start_open_on_all_addresses(tmp_path):
    from cbir.index import Index

    idx = Index(4, "exact", device="cpu")
    idx.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    idx.save(tmp_path / "ix")
    env = {k: v for k, v in __import__("os").environ.items() if k != "CBIR_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "cbir", "serve", str(tmp_path / "ix"), "--host", "0.0.0.0",
                        "--no-preload"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "without a write token" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "serving on" not in r.stderr


def test_store_budget(demo_index):
    """--max-store-gb: an upload that would pass the budget is refused (413); a removal frees room."""
    from cbir.server import Limits

    one = len(photo(1))
    client = client_for(demo_index, limits=Limits(max_store_bytes=int(2.5 * one)))
    ids = [upload(client, s).json()["id"] for s in (1, 2)]
    r = upload(client, 3)
    assert r.status_code == 413 and "store is full" in r.json()["detail"], r.text
    assert client.get("/api/health").json()["images"] == 35
    assert client.delete(f"/api/images/{ids[0]}").status_code == 200
    assert upload(client, 3).status_code == 201
    # the budget counts what is already stored when the service starts
    client2 = client_for(demo_index, limits=Limits(max_store_bytes=int(2.5 * one)))
    assert upload(client2, 4).status_code == 413


def test_hostile_headers_property(demo_index):
    """Random Host and Origin headers (hypothesis, 200 each): never a 5xx; a read passes exactly when the
    host is allowed; a write passes the Origin check exactly when Origin names the request's own host."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from cbir.server.security import host_of

    client = client_for(demo_index)
    allowed = {"localhost", "127.0.0.1", "::1"}
    text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
    hosts = st.one_of(text, st.sampled_from(["localhost", "127.0.0.1", "[::1]"]).flatmap(
        lambda h: st.tuples(st.just(h), st.integers(0, 65535)).map(lambda t: f"{t[0]}:{t[1]}")))
    seen = {"reads": 0, "writes": 0}

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(host=hosts)
    def reads(host):
        r = client.get("/api/health", headers={"host": host})
        seen["reads"] += 1
        assert r.status_code == (200 if host.strip() and host_of(host) in allowed else 400), (host, r.status_code)

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(origin=st.one_of(text, text.map(lambda t: "http://" + t), st.just("http://127.0.0.1:8000")))
    def writes(origin):
        r = client.delete(f"/api/images/{10**12}", headers={"origin": origin, "host": "127.0.0.1:8000"})
        seen["writes"] += 1
        try:  # an origin is scheme://host[:port]; it must name this host and port
            same = urlsplit(origin.strip()).netloc.lower() == "127.0.0.1:8000"
        except ValueError:
            same = False
        assert r.status_code == (404 if same else 403), (origin, r.status_code)

    reads()
    writes()
    assert seen["reads"] >= 200 and seen["writes"] >= 200
