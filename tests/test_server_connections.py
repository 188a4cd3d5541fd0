"""Slow and too many clients (issue 19.6): header and body timeouts, the connection limit, the
header size limit, kept-alive connections, and the options of `cbir serve` that set them.

Every test runs the real app over the demo index in a uvicorn server on 127.0.0.1 with the limits
under test (cbir.server.ConnectionLimits), and talks to it with raw sockets where a well-behaved
client library could not misbehave on purpose.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import statistics
import threading
import time

import pytest

from cbir.cli import main

httpx = pytest.importorskip("httpx")

HEALTH = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def app_for(demo_index):
    from cbir.server import create_app

    idx, path, encoder = demo_index
    return create_app(idx, index_path=path, encoder=encoder, device="cpu", read_only=True)


def serve(demo_index, **limits):
    from cbir.server import BackgroundServer, ConnectionLimits

    return BackgroundServer(app_for(demo_index), limits=ConnectionLimits(**limits))


class Records(logging.Handler):
    """The records of a logger (uvicorn's loggers do not propagate to the root, so caplog misses them)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers + Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(next(v for k, v in (ln.split(b":", 1) for ln in head.split(b"\r\n")[1:])
                      if k.strip().lower() == b"content-length"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    assert len(rest) == length
    return head + b"\r\n\r\n" + rest


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes the connection, and when it closed (None: still open)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, None
    except ConnectionResetError:
        pass
    return data, time.monotonic()


def health_latencies(url: str, n: int, until: float = math.inf) -> list[float]:
    """Seconds of ``n`` GET /api/health, each on a new connection (a new visitor); stops at ``until``."""
    out = []
    for _ in range(n):
        if time.monotonic() > until:
            break
        t0 = time.perf_counter()
        r = httpx.get(url + "/api/health", timeout=30)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    return out


def test_slowloris_is_dropped_while_health_stays_fast(demo_index):
    """50 sockets: 40 send a request's headers one byte at a time and never finish, 10 send nothing.
    Each is answered 408 and closed once the header timeout has passed (not before), although bytes
    keep coming; meanwhile GET /api/health from another client answers, about as fast as without them."""
    timeout, n_slow, n_silent = 3.0, 40, 10
    with serve(demo_index, header_timeout=timeout, max_connections=200) as url:
        health_latencies(url, 3)  # warm
        quiet = statistics.median(health_latencies(url, 15))
        header = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000
        socks = [socket.create_connection(("127.0.0.1", port_of(url))) for _ in range(n_slow + n_silent)]
        opened = time.monotonic()
        closed: dict[int, float] = {}
        replies: dict[int, bytes] = {}
        sent = [0] * len(socks)
        stop = threading.Event()

        def attacker() -> None:
            while not stop.is_set() and len(closed) < len(socks):
                for i, s in enumerate(socks):
                    if i in closed:
                        continue
                    if select.select([s], [], [], 0)[0]:  # the server answered or closed
                        replies[i], _ = read_until_closed(s, 1.0)
                        closed[i] = time.monotonic()
                        continue
                    if i < n_slow:
                        try:
                            s.send(header[sent[i]:sent[i] + 1])
                            sent[i] += 1
                        except OSError:
                            replies[i], closed[i] = b"", time.monotonic()
                time.sleep(0.05)

        thread = threading.Thread(target=attacker, daemon=True)
        thread.start()
        try:
            time.sleep(0.3)  # every slow socket has sent some bytes
            during = health_latencies(url, 15, until=opened + timeout - 0.5)
            measured_by = time.monotonic()
            thread.join(timeout + 10)
        finally:
            stop.set()
            for s in socks:
                s.close()
    assert len(during) >= 5, "too few health requests during the attack"
    assert measured_by < opened + timeout and not any(t < measured_by for t in closed.values()), \
        "health was not measured while the attack's sockets were open"
    # health during the attack: as fast as without it, within a factor (a ratio, the machine is shared)
    assert statistics.median(during) <= 5 * quiet, (during, quiet)
    # every socket dropped after the header timeout, not before, and within a couple of seconds of it
    assert sorted(closed) == list(range(len(socks))), f"{len(socks) - len(closed)} sockets still open"
    waited = [closed[i] - opened for i in range(len(socks))]
    assert min(waited) >= timeout - 0.25 and max(waited) <= timeout + 2.5, waited
    assert min(sent[:n_slow]) >= 10  # the slow ones kept sending until they were dropped
    assert all(r == b"" or r.startswith(b"HTTP/1.1 408 ") for r in replies.values()), set(replies.values())
    assert sum(r.startswith(b"HTTP/1.1 408 ") for r in replies.values()) >= n_silent


def test_a_slow_upload_is_dropped_and_others_are_served(demo_index, demo):
    """A search upload whose body comes one byte every 50 ms: 408 and closed at the body timeout
    (the application sees a disconnected client, nothing logged as an error); a normal upload at the
    same time is answered."""
    timeout = 2.0
    photo = (demo / "jpg" / "paris_defense_000015.jpg").read_bytes()
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + photo + b"\r\n--XyZ--\r\n")
    head = (b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    server = serve(demo_index, body_timeout=timeout)
    log = Records()
    logging.getLogger("uvicorn.error").addHandler(log)  # after the server's Config set up uvicorn's logging
    with server as url:
        s = socket.create_connection(("127.0.0.1", port_of(url)))
        s.sendall(head + body[:100])
        t0 = time.monotonic()
        reply, closed_at = b"", None
        sent = 100
        while closed_at is None and time.monotonic() < t0 + timeout + 5:
            if select.select([s], [], [], 0.05)[0]:
                reply, closed_at = read_until_closed(s, 2.0)
                break
            try:
                s.send(body[sent:sent + 1])
                sent += 1
            except OSError:
                closed_at = time.monotonic()
            if sent == 150:  # meanwhile, an ordinary client
                r = httpx.post(url + "/api/search", files={"file": ("q.jpg", photo, "image/jpeg")},
                               data={"top": "3"}, timeout=60)
                assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
        s.close()
        assert closed_at is not None, "the slow upload was not dropped"
        assert timeout - 0.25 <= closed_at - t0 <= timeout + 2.5, closed_at - t0
        assert sent < len(body)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        assert httpx.get(url + "/api/health", timeout=30).status_code == 200
    logging.getLogger("uvicorn.error").removeHandler(log)
    messages = [r.getMessage() for r in log.records]
    assert not [r for r in log.records if r.levelno >= logging.ERROR], messages
    assert any("body did not arrive within 2 s" in m for m in messages), messages


def test_connection_limit_answers_503_beyond_it(demo_index):
    """max_connections=3: three kept-alive clients are served; a fourth connection gets 503; once one of
    the three leaves, the fourth is served."""
    with serve(demo_index, max_connections=3, keep_alive=30) as url:
        clients = [httpx.Client(base_url=url, timeout=30) for _ in range(4)]
        try:
            assert [c.get("/api/health").status_code for c in clients[:3]] == [200, 200, 200]
            r = clients[3].get("/api/health")
            assert r.status_code == 503 and r.headers["connection"] == "close", r.text
            assert [c.get("/api/health").status_code for c in clients[:3]] == [200, 200, 200]  # the 4th was closed
            assert clients[3].get("/api/health").status_code == 503  # again: still 3 others
            clients[0].close()
            deadline = time.monotonic() + 10
            while (code := clients[3].get("/api/health").status_code) != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert code == 200
            assert clients[1].get("/api/health").status_code == 200
        finally:
            for c in clients:
                c.close()


def test_kept_alive_connection_outlives_the_header_timeout_but_not_a_slow_second_request(demo_index):
    """Idle between requests is the keep-alive's business (3 s here), not the header timeout's (1 s); the
    header deadline starts again at the first byte of the next request."""
    with serve(demo_index, header_timeout=1.0, keep_alive=3.0) as url:
        s = socket.create_connection(("127.0.0.1", port_of(url)))
        s.settimeout(10)
        for _ in range(2):
            s.sendall(HEALTH)
            assert read_response(s).startswith(b"HTTP/1.1 200 ")
            time.sleep(1.5)  # idle, longer than the header timeout
        s.sendall(HEALTH[:20])
        t0 = time.monotonic()
        reply, closed_at = read_until_closed(s, 5.0)
        s.close()
    assert reply.startswith(b"HTTP/1.1 408 ") and closed_at is not None
    assert 0.75 <= closed_at - t0 <= 3.0, closed_at - t0


def test_idle_kept_alive_connection_is_closed_after_keep_alive(demo_index):
    with serve(demo_index, header_timeout=5.0, keep_alive=1.0) as url:
        s = socket.create_connection(("127.0.0.1", port_of(url)))
        s.sendall(HEALTH)
        t0 = time.monotonic()
        reply, closed_at = read_until_closed(s, 6.0)
        s.close()
    assert reply.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408" not in reply  # closed without a word
    assert closed_at is not None and 0.75 <= closed_at - t0 <= 3.0, closed_at - t0


def test_headers_growing_past_the_size_limit_are_refused(demo_index):
    """h11's limit on an incomplete request head: headers still incomplete past 4 KB (sent in 1 KB
    pieces) get 400 and the connection is closed; 2 KB of headers are fine."""
    with serve(demo_index, max_header_bytes=4096) as url:
        assert httpx.get(url + "/api/health", headers={"X-Pad": "a" * 2000}, timeout=30).status_code == 200
        s = socket.create_connection(("127.0.0.1", port_of(url)))
        head = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n"
        try:
            for i in range(0, len(head), 1024):
                s.sendall(head[i:i + 1024])
                time.sleep(0.05)
        except OSError:  # closed under our feet: the answer is already there
            pass
        reply, closed_at = read_until_closed(s, 10.0)
        s.close()
    assert reply.startswith(b"HTTP/1.1 400 ") and closed_at is not None, reply[:200]


@pytest.mark.parametrize("field, value", [("header_timeout", 0), ("body_timeout", -1.0), ("keep_alive", math.nan),
                                          ("shutdown_timeout", math.inf), ("max_connections", 2.5),
                                          ("max_header_bytes", True), ("max_connections", "10")])
def test_limits_refuse_bad_values_naming_the_field(field, value):
    from cbir.server import ConnectionLimits

    with pytest.raises(ValueError, match=field) as exc:
        ConnectionLimits(**{field: value})
    assert exc.value.field == field


def test_uvicorn_config_carries_the_limits():
    """uvicorn's own settings where it has one; the 503 threshold is max_connections + 1 (uvicorn
    refuses at >= limit_concurrency connections, this one included)."""
    from cbir.server import ConnectionLimits
    from cbir.server.connections import uvicorn_config
    from cbir.server.protocol import TimedH11Protocol

    limits = ConnectionLimits(header_timeout=7, body_timeout=11, keep_alive=2, max_connections=9,
                              max_header_bytes=5000, shutdown_timeout=4)
    cfg = uvicorn_config(object(), "127.0.0.1", 1234, limits)
    assert issubclass(cfg.http, TimedH11Protocol)
    assert (cfg.http.header_timeout, cfg.http.body_timeout) == (7.0, 11.0)
    assert (cfg.timeout_keep_alive, cfg.limit_concurrency, cfg.h11_max_incomplete_event_size,
            cfg.timeout_graceful_shutdown) == (2, 10, 5000, 4)


@pytest.mark.parametrize("flag, value", [("--header-timeout", "0"), ("--body-timeout", "nan"),
                                         ("--keep-alive", "-2"), ("--max-connections", "0"),
                                         ("--max-header-kb", "inf"), ("--shutdown-timeout", "-1")])
def test_cbir_serve_refuses_bad_limits_in_one_line(tmp_path, capsys, flag, value):
    rc = main(["serve", str(tmp_path / "no.index"), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
