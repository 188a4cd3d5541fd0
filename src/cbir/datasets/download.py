"""Downloads of the benchmarks from their official sites: resumable, checksummed, atomic.

``download_file(url, dest, sha256)`` writes ``dest.part``, resuming an earlier partial file with an
HTTP ``Range`` request (a server that ignores it makes us start over), checks the SHA-256 where it
is known, and only then renames the file to ``dest``; a mismatch deletes the partial file and
raises :class:`ChecksumError`. A host that cannot be reached fails at once with
:class:`DownloadError` (no retries, no waiting). ``file://`` URLs work the same way (tests, mirrors).

``fetch(name, data_root)`` downloads a named dataset into the layout ``cbir.datasets`` reads:
``data_root/datasets/<name>/`` with the ground truth and a ``jpg/`` folder. Image archives are
unpacked into a temporary folder and renamed to ``jpg/`` when all of them are in.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..fileio import fsync_dir, sha256_file

CHUNK = 1 << 20

REVISITOP = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
REVISITOP1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
PARIS = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
GLDV2 = "https://s3.amazonaws.com/google-landmark"
HOLIDAYS = "ftp://ftp.inrialpes.fr/pub/lear/douze/data"  # INRIA Holidays, jpg1 + jpg2 = the 1491 images

# SHA-256 of the official files we could check (the revisitop ground truth, as published).
KNOWN_SHA256 = {
    "gnd_roxford5k.pkl": "ba7967754bd2d7d2210a5799f9c45ad5835e269a80ef9d3eba44caa35816c471",
    "gnd_rparis6k.pkl": "d2e729a5293dda7dda8a15c8383424a42e4964a2c4cfea2f32fa85d11d2df499",
}


class DownloadError(RuntimeError):
    """A download could not be done (offline, HTTP error); the message says what to do."""


class ChecksumError(DownloadError):
    """The downloaded bytes are not the expected file."""


@dataclass(frozen=True)
class Remote:
    """One file of a dataset: where it comes from and what becomes of it.

    ``dest``: path relative to the dataset folder. ``unpack``: "" (keep), "flat" (every file of
    the archive into ``jpg/``, sub-folders dropped: Oxford/Paris) or "tree" (into ``jpg/`` keeping
    the archive's folders: revisitop1m, GLDv2), "gt" (into ``gt/``).
    """

    url: str
    dest: str
    sha256: str | None = None
    unpack: str = ""


def _files(name: str, with_images: bool = True) -> list[Remote]:
    if name in ("roxford5k", "rparis6k"):
        files = [Remote(f"{REVISITOP}/{name}/gnd_{name}.pkl", f"gnd_{name}.pkl", KNOWN_SHA256[f"gnd_{name}.pkl"])]
        if with_images:
            tgz = [f"{OXFORD}/oxbuild_images-v1.tgz"] if name == "roxford5k" else [
                f"{PARIS}/paris_1-v1.tgz", f"{PARIS}/paris_2-v1.tgz"]
            files += [Remote(u, "archives/" + u.rsplit("/", 1)[1], None, "flat") for u in tgz]
        return files
    if name in ("oxford5k", "paris6k"):
        gt = f"{OXFORD}/gt_files_170407.tgz" if name == "oxford5k" else f"{PARIS}/paris_120310.tgz"
        files = [Remote(gt, "archives/" + gt.rsplit("/", 1)[1], None, "gt")]
        if with_images:
            tgz = [f"{OXFORD}/oxbuild_images-v1.tgz"] if name == "oxford5k" else [
                f"{PARIS}/paris_1-v1.tgz", f"{PARIS}/paris_2-v1.tgz"]
            files += [Remote(u, "archives/" + u.rsplit("/", 1)[1], None, "flat") for u in tgz]
        return files
    if name == "revisitop1m":
        files = [Remote(f"{REVISITOP1M}/revisitop1m.txt", "revisitop1m.txt")]
        if with_images:
            files += [Remote(f"{REVISITOP1M}/jpg/revisitop1m.{i}.tar.gz", f"archives/revisitop1m.{i}.tar.gz", None, "tree")
                      for i in range(1, 101)]
        return files
    if name == "holidays":  # no published checksums; an interrupted ftp transfer restarts
        return [Remote(f"{HOLIDAYS}/{a}", f"archives/{a}", None, "flat") for a in ("jpg1.tar.gz", "jpg2.tar.gz")]
    if name == "gldv2":
        files = [Remote(f"{GLDV2}/metadata/index.csv", "index.csv"), Remote(f"{GLDV2}/metadata/test.csv", "test.csv"),
                 Remote(f"{GLDV2}/ground_truth/retrieval_solution_v2.1.csv", "retrieval_solution_v2.1.csv")]
        if with_images:
            files += [Remote(f"{GLDV2}/index/images_{i:03d}.tar", f"archives/index_{i:03d}.tar", None, "tree:index")
                      for i in range(100)]
            files += [Remote(f"{GLDV2}/test/images_{i:03d}.tar", f"archives/test_{i:03d}.tar", None, "tree:test")
                      for i in range(20)]
        return files
    raise ValueError(f"unknown dataset {name!r} (downloadable: {', '.join(DOWNLOADABLE)})")


DOWNLOADABLE = ("roxford5k", "rparis6k", "revisitop1m", "oxford5k", "paris6k", "gldv2", "holidays")


def _open(url: str, offset: int, timeout: float, dest: Path):
    """(response-like, resumed: bool, total size or None)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.is_file():
            raise DownloadError(f"{url}: file not found")
        fh = open(path, "rb")
        size = path.stat().st_size
        if 0 < offset <= size:
            fh.seek(offset)
            return fh, True, size
        return fh, False, size
    if parsed.scheme not in ("http", "https", "ftp"):
        raise DownloadError(f"{url}: only http(s), ftp and file URLs can be downloaded")
    req = urllib.request.Request(url, headers={"User-Agent": "cbir-download/1"})
    if offset and parsed.scheme != "ftp":  # ftp: no ranges here, a partial file is fetched again
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to fetch: the partial file is complete
            return None, True, offset
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot reach {parsed.netloc} ({reason}); no internet connection? Download {url} by hand "
            f"to {dest}, then run the command again"
        ) from exc
    resumed = offset > 0 and resp.status == 206
    length = resp.headers.get("Content-Length")
    total = (int(length) + (offset if resumed else 0)) if length is not None else None
    return resp, resumed, total


def download_file(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    *,
    timeout: float = 30.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (resumable via ``dest.part``, checksummed, atomic). Returns ``dest``.

    An existing ``dest`` whose checksum matches (or with no known checksum) is kept as it is.
    ``progress(done_bytes, total_bytes_or_None)`` is called as data arrives.
    """
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    resp, resumed, total = _open(url, offset, timeout, dest)
    if resp is not None:
        with resp, open(part, "ab" if resumed else "wb") as out:
            done = offset if resumed else 0
            try:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            except OSError as exc:
                raise DownloadError(f"{url}: connection lost after {done} bytes ({exc}); run again to resume") from exc
            out.flush()
            os.fsync(out.fileno())
        if total is not None and part.stat().st_size != total:
            raise DownloadError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256:
            part.unlink()
            raise ChecksumError(f"{url}: SHA-256 {got} does not match the expected {sha256}; the partial file was deleted")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _unpack(archive: Path, into: Path, mode: str) -> int:
    """Unpack ``archive`` into the folder ``into``; returns the number of files."""
    into.mkdir(parents=True, exist_ok=True)
    n = 0
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        if mode == "flat" or mode == "gt":
            for m in members:
                base = os.path.basename(m.name)
                if not base or base.startswith("."):
                    continue
                src = tar.extractfile(m)
                if src is None:
                    continue
                with src, open(into / base, "wb") as out:
                    shutil.copyfileobj(src, out)
                n += 1
        else:
            tar.extractall(into, members=members, filter="data")
            n = len(members)
    return n


def fetch(
    name: str,
    data_root: str | Path,
    *,
    with_images: bool = True,
    keep_archives: bool = False,
    timeout: float = 30.0,
    progress: Callable[[str, int, int | None], None] | None = None,
    files: Iterable[Remote] | None = None,
) -> Path:
    """Download dataset ``name`` into ``data_root/datasets/<name>``; returns that folder.

    Safe to rerun: finished files are kept, partial ones resume, and the image folder appears
    (by rename) only when every archive is unpacked. ``files`` overrides the official list (tests).
    """
    root = Path(data_root) / "datasets" / name
    root.mkdir(parents=True, exist_ok=True)
    remotes = list(files) if files is not None else _files(name, with_images)
    for r in remotes:
        dest = root / r.dest
        target = _unpack_target(root, r.unpack)
        staging = root / f".{target.name}.partial"
        marker = _marker(root, r)
        if r.unpack and marker.is_file() and (target.is_dir() or staging.is_dir()):
            continue  # unpacked in an earlier run
        cb = (lambda done, total, _u=r.url: progress(_u, done, total)) if progress else None
        download_file(r.url, dest, r.sha256, timeout=timeout, progress=cb)
        if not r.unpack:
            continue
        if not staging.is_dir():
            if target.is_dir():  # add to a finished folder: unpack beside it, rename at the end
                target.rename(staging)
            else:
                staging.mkdir()
        sub = r.unpack.split(":", 1)[1] if ":" in r.unpack else ""
        _unpack(dest, staging / sub if sub else staging, r.unpack.split(":", 1)[0])
        marker.write_text("ok\n")
        if not keep_archives:
            dest.unlink()
    # a folder appears only when every archive that goes into it is unpacked
    for target in {_unpack_target(root, r.unpack) for r in remotes if r.unpack}:
        staging = root / f".{target.name}.partial"
        parts = [r for r in remotes if r.unpack and _unpack_target(root, r.unpack) == target]
        if staging.is_dir() and not target.exists() and all(_marker(root, r).is_file() for r in parts):
            os.replace(staging, target)
    fsync_dir(root)
    if not keep_archives and (root / "archives").is_dir() and not any((root / "archives").iterdir()):
        (root / "archives").rmdir()
    return root


def _marker(root: Path, r: Remote) -> Path:
    return root / f".{Path(r.dest).name}.done"


def _unpack_target(root: Path, mode: str) -> Path:
    return root / ("gt" if mode == "gt" else "jpg")
