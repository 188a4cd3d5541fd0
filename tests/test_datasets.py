"""Dataset readers and downloads (a local HTTP server on 127.0.0.1 and file:// URLs; never the network)."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cbir.datasets import (
    count_distractors,
    demo_root,
    from_csv,
    from_folder,
    from_original_gt,
    iter_distractors,
    load_dataset,
    load_demo,
    load_gldv2,
    load_gnd,
    read_original_gt,
)
from cbir.datasets.download import ChecksumError, DownloadError, Remote, download_file, fetch, sha256_file
from cbir.fileio import FormatError

# --------------------------------------------------------------------------------------------
# a tiny HTTP server that honours (or, on request, ignores) Range, and counts bytes sent
# --------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    honour_range = True
    sent: list[int] = []
    cut_after: int | None = None  # drop the connection after this many body bytes (once)

    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = type(self).cut_after
        # recorded before writing: the client may check ``sent`` as soon as it has the bytes
        if cut is not None:
            type(self).cut_after = None
            type(self).sent.append(cut)
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        type(self).sent.append(len(body))
        self.wfile.write(body)


@pytest.fixture()
def server():
    class H(_Handler):
        files, sent, honour_range, cut_after = {}, [], True, None

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield H, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def test_download_resumes_with_range(server, tmp_path):
    H, base = server
    H.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    # first attempt: the connection drops after 300000 bytes -> partial file, error, no dest
    H.cut_after = 300_000
    with pytest.raises(DownloadError, match="resume"):
        download_file(f"{base}/f.bin", dest, hashlib.sha256(PAYLOAD).hexdigest())
    assert not dest.exists() and (tmp_path / "f.bin.part").stat().st_size == 300_000
    # second attempt asks only for the rest
    download_file(f"{base}/f.bin", dest, hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    assert H.sent == [300_000, len(PAYLOAD) - 300_000]
    # a third call with the file in place downloads nothing
    download_file(f"{base}/f.bin", dest, hashlib.sha256(PAYLOAD).hexdigest())
    assert len(H.sent) == 2


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    H, base = server
    H.files["/f.bin"] = PAYLOAD
    H.honour_range = False
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"garbage-from-elsewhere")
    download_file(f"{base}/f.bin", dest, hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    H, base = server
    H.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    with pytest.raises(ChecksumError, match="does not match"):
        download_file(f"{base}/f.bin", dest, "0" * 64)
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()


def test_offline_fails_at_once_with_clear_message(tmp_path, monkeypatch):
    """At once = one connection attempt, no retry, no back-off sleep (counted, not timed)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    connects, sleeps = [], []
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connects.append(addr) or real_connect(self, addr))
    monkeypatch.setattr(time, "sleep", lambda sec: sleeps.append(sec))
    with pytest.raises(DownloadError, match="cannot reach .*by hand"):
        download_file(f"http://127.0.0.1:{port}/gnd.pkl", tmp_path / "gnd.pkl")
    assert connects == [("127.0.0.1", port)] and sleeps == []
    assert not (tmp_path / "gnd.pkl").exists()


def test_file_url_resume(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "x.bin"
    dest.parent.mkdir()
    (dest.parent / "x.bin.part").write_bytes(PAYLOAD[:1000])
    download_file(src.as_uri(), dest, sha256_file(src))
    assert dest.read_bytes() == PAYLOAD


def _tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fetch_dataset_layout_and_atomic_image_folder(server, tmp_path):
    H, base = server
    gnd = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 2, 2], "easy": [0], "hard": [], "junk": [1]}]}
    gbytes = pickle.dumps(gnd)
    H.files["/gnd_roxford5k.pkl"] = gbytes
    H.files["/part1.tgz"] = _tgz({"toy/x/a.jpg": b"A", "toy/y/b.jpg": b"B"})
    H.files["/part2.tgz"] = _tgz({"toy/q.jpg": b"Q"})
    files = [
        Remote(f"{base}/gnd_roxford5k.pkl", "gnd_roxford5k.pkl", hashlib.sha256(gbytes).hexdigest()),
        Remote(f"{base}/part1.tgz", "archives/part1.tgz", None, "flat"),
        Remote(f"{base}/part2.tgz", "archives/part2.tgz", None, "flat"),
        Remote(f"{base}/missing.tgz", "archives/missing.tgz", None, "flat"),
    ]
    with pytest.raises(DownloadError, match="404"):
        fetch("roxford5k", tmp_path, files=files)
    root = tmp_path / "datasets" / "roxford5k"
    assert not (root / "jpg").exists()  # the image folder appears only when complete
    fetch("roxford5k", tmp_path, files=files[:3])
    assert sorted(p.name for p in (root / "jpg").iterdir()) == ["a.jpg", "b.jpg", "q.jpg"]
    assert not (root / "archives").exists()
    ds = load_dataset("roxford5k", tmp_path)  # finds the download layout
    assert ds.db_paths[0] == root / "jpg" / "a.jpg" and ds.query_bboxes == [(0.0, 0.0, 2.0, 2.0)]
    sent = len(H.sent)
    fetch("roxford5k", tmp_path, files=files[:3])  # rerun: nothing downloaded again
    assert len(H.sent) == sent


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------


def test_gnd_loader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    p = tmp_path / "gnd_evil.pkl"
    p.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Evil()]}))
    with pytest.raises(FormatError, match="refusing"):
        load_gnd(p)
    p.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}))
    with pytest.raises(FormatError, match="outside"):
        load_gnd(p)


@pytest.mark.shared
def test_revisitop_gnd_real(roxford_gnd):
    from conftest import shared_path

    g = load_gnd(shared_path("data", "revisitop", "gnd_roxford5k.pkl"))
    assert len(g["imlist"]) == 4993 and len(g["qimlist"]) == 70
    assert g["gnd"][0]["easy"] == list(roxford_gnd["gnd"][0]["easy"])
    # the official checksums the downloader pins are those of the reference files
    from cbir.datasets.download import KNOWN_SHA256

    for name in ("gnd_roxford5k.pkl", "gnd_rparis6k.pkl"):
        assert sha256_file(shared_path("data", "revisitop", name)) == KNOWN_SHA256[name]


@pytest.mark.shared
def test_original_gt_real():
    from conftest import shared_path

    for folder, n_lm in (("oxford_gt_files_170407", 11), ("paris_120310", 11)):
        q = read_original_gt(shared_path("data", "original-gt", folder))
        assert len(q) == 55 and len({x["query"].rsplit("_", 1)[0] for x in q}) == n_lm
        assert all(len(x["bbox"]) == 4 and (x["good"] or x["ok"]) for x in q)  # Paris lists all in ok
        assert not any(x["image"].startswith("oxc1_") or x["image"].endswith(".jpg") for x in q)
    ox = read_original_gt(shared_path("data", "original-gt", "oxford_gt_files_170407"))
    first = ox[0]
    assert first["query"] == "all_souls_1" and first["image"] == "all_souls_000013"
    assert first["bbox"] == (136.5, 34.1, 648.5, 955.7)
    assert len(first["good"]) == len(set(first["good"]))  # the file lists all_souls_000091 twice


@pytest.mark.shared
def test_original_protocol_on_real_fc7(oxford_fc7):
    """Original Oxford5k protocol (55 queries, full-image queries) on the real fc7 descriptors."""
    from conftest import shared_path

    x, names = oxford_fc7
    ds = from_original_gt(shared_path("data", "original-gt", "oxford_gt_files_170407"), names)
    assert ds.info["missing"] == 0 and len(ds.query_ids) == 55
    row = {n: i for i, n in enumerate(names)}
    q = x[[row[n] for n in ds.query_ids]]
    res = ds.evaluate(q @ x.T)
    # each query image is itself in the database and among its good images: rank 1 is a positive
    assert res["mP"]["all"][1] == pytest.approx(100.0)
    assert 20.0 < res["mAP"]["all"] < 80.0


def test_distractor_list_streamed(tmp_path):
    lst = tmp_path / "revisitop1m.txt"
    lst.write_text("1/a.jpg\n\n2/b.jpg\n3/c\n")
    items = iter_distractors(lst)
    assert next(items) == ("1/a", tmp_path / "jpg" / "1" / "a.jpg")  # a generator: one line at a time
    assert [i for i, _ in items] == ["2/b", "3/c"]
    assert count_distractors(lst) == 3


def test_gldv2_reader(tmp_path):
    (tmp_path / "index.csv").write_text("id,url\naaa1,u\nbbb2,u\nccc3,u\n")
    (tmp_path / "test.csv").write_text("id,url\nq001,u\nq002,u\nq003,u\n")
    (tmp_path / "retrieval_solution_v2.1.csv").write_text(
        "id,images,Usage\nq001,bbb2 ccc3,Public\nq002,None,Ignored\nq003,aaa1,Private\n")
    ds = load_gldv2(tmp_path)
    assert ds.query_ids == ["q001", "q003"] and [g["ok"] for g in ds.gnd] == [[1, 2], [0]]
    assert ds.db_paths[0] == tmp_path / "index" / "a" / "a" / "a" / "aaa1.jpg"
    # q001 ranks ccc3 first (rel), aaa1, bbb2 (rel): AP@100 = (1 + 2/3)/2 ; q003: aaa1 first -> 1
    scores = np.array([[0.5, 0.1, 0.9], [0.9, 0.1, 0.0]])
    res = ds.evaluate(scores)
    assert res["mAP@100"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)


def _touch_images(root: Path, rels):
    for r in rels:
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        (root / r).write_bytes(b"x")


def test_user_folder_and_csv(tmp_path):
    _touch_images(tmp_path / "photos", ["cat/1.jpg", "cat/2.jpg", "cat/3.png", "dog/1.jpg", "owl/1.jpg"])
    ds = from_folder(tmp_path / "photos", queries=["cat/1.jpg", "dog/1"])
    assert ds.db_ids == ["cat/1", "cat/2", "cat/3", "dog/1", "owl/1"]
    assert ds.gnd[0] == {"ok": [1, 2], "junk": [0]} and ds.gnd[1] == {"ok": [], "junk": [3]}
    # sampled queries come only from classes with >= 2 images, and the seed fixes them
    s1 = from_folder(tmp_path / "photos", n_queries=2, seed=3)
    assert s1.query_ids == from_folder(tmp_path / "photos", n_queries=2, seed=3).query_ids
    assert all(q.startswith("cat/") for q in s1.query_ids)
    with pytest.raises(KeyError, match="bird"):
        from_folder(tmp_path / "photos", queries=["bird/1.jpg"])
    csv = tmp_path / "photos" / "labels.csv"
    csv.write_text("image,label\ncat/1.jpg,c\ndog/1.jpg,c\nowl/1.jpg,o\n")
    ds = from_csv(csv, n_queries=5)
    assert ds.query_ids == ["cat/1", "dog/1"] and ds.gnd[0]["ok"] == [1]
    # ranking: query cat/1 finds dog/1 right after itself (junk) -> AP 1
    res = ds.evaluate(np.array([[1.0, 0.9, 0.1], [0.2, 1.0, 0.1]]))
    assert res["mAP"]["all"] == pytest.approx(100.0)
    assert res["recall"][1] == pytest.approx(100.0)


def test_demo_set_is_bundled_and_consistent():
    root = demo_root()
    ds = load_demo()
    jpgs = sorted((root / "jpg").glob("*.jpg"))
    assert len(jpgs) <= 40 and len(ds.db_ids) + len(ds.query_ids) == len(jpgs)
    assert sum(p.stat().st_size for p in root.rglob("*")) < 3_000_000
    from PIL import Image

    for p, box in zip(ds.query_paths, ds.query_bboxes):
        with Image.open(p) as im:
            assert max(im.size) <= 512
            assert 0 <= box[0] < box[2] <= im.size[0] + 1 and 0 <= box[1] < box[3] <= im.size[1] + 1
    for g in ds.gnd:
        assert len(g["easy"]) + len(g["hard"]) >= 2
        assert not set(g["easy"]) & set(g["junk"])
    # the manifest matches the files (so a damaged install is detectable)
    lines = (root / "MANIFEST.txt").read_text().split("\n")
    for line in filter(None, lines):
        digest, rel = line.split("  ")
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest


@pytest.mark.shared
def test_demo_ground_truth_is_the_revisitop_one(rparis250_gnd):
    """Remapped indices name the same images as the reference subset's ground truth."""
    demo = load_demo()
    ref_q = {n: g for n, g in zip(rparis250_gnd["qimlist"], rparis250_gnd["gnd"])}
    for q, g in zip(demo.query_ids, demo.gnd):
        r = ref_q[q]
        for k in ("easy", "hard", "junk"):
            got = {demo.db_ids[i] for i in g[k]}
            want = {rparis250_gnd["imlist"][i] for i in r[k]} & set(demo.db_ids)
            assert got == want
        assert g["bbx"][2] == pytest.approx(r["bbx"][2] / 2, abs=0.6)  # 1024 -> 512 px
