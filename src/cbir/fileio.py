"""Atomic, versioned writes shared by every stage that persists something.

A file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed over
the target (``os.replace`` is atomic on POSIX), so a crash leaves either the old file or the new
one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


class FormatError(ValueError):
    """A file on disk is not what it claims to be (wrong kind, wrong version, damaged)."""


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; elsewhere
    set-and-restore, which is not thread-safe but only runs where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    """Permissions a plain ``open(path, "w")`` would give: the existing file's, else 0666 minus the umask
    (``mkstemp`` creates 0600 files, which would hide the user's data from their group)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def _committed(path: Path) -> Iterator[str]:
    """The one commit sequence of every atomic write: yields the name of a new temporary sibling of
    ``path``; when the block ends without an exception, the file gets the mode a plain write would give
    (:func:`_target_mode`), is fsync'ed and renamed over ``path``, and the folder is fsync'ed; on any
    exception the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), _target_mode(path))
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary sibling of ``path`` for writing; on success fsync and rename it over ``path``."""
    with _committed(Path(path)) as tmp, open(tmp, mode) as fh:
        yield fh


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as strict JSON (ValueError for NaN or ±inf, which JSON has no word for: write None), atomically."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not written: {exc} (NaN/inf are not JSON; give None)") from exc
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[str], None]) -> None:
    """Atomic write for libraries that only write to a filename (faiss, torch.save to a path):
    ``writer(tmp)`` writes a temporary sibling, committed as :func:`atomic_open` commits."""
    with _committed(Path(path)) as tmp:
        writer(tmp)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of some bytes: a file's content identity, equal to :func:`sha256_file` of a file
    holding them (the service's uploads, ``index add``'s duplicates and the caches all name content so)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def load_error_reason(exc: BaseException) -> str:
    """One line saying why a safe load (``torch.load(weights_only=True)``, a restricted unpickler)
    refused or failed, without torch's advice to load the file unsafely (``weights_only=False``,
    "if you trust the source", add_safe_globals): that advice is never repeated to the user."""
    import re

    text = str(exc)
    m = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)
    if m:
        return f"it holds a Python object ({m.group(1)}) that a data file may not (refused: loading it could run code)"
    if isinstance(exc, EOFError):
        return "empty or truncated"
    advice = re.compile(r"weights_only|trust|arbitrary code|safe_globals|can still be loaded|file an issue|"
                        r"documentation|re-running|pytorch\.org", re.IGNORECASE)
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in text.splitlines()]
    facts = [ln for ln in lines if ln and not advice.search(ln) and not ln.lower().startswith("weights only load failed")
             and not ln.startswith("(")]
    if "weights only load failed" in text.lower():
        return f"it holds pickled data that a safe load refuses ({facts[0] if facts else 'not plain tensors'})"
    first = (facts[0] if facts else type(exc).__name__).split(". ")[0]
    return f"damaged or not a PyTorch file ({first[:200]})"


#: Default bounds of :func:`read_json`: file size, and nesting depth of objects / lists.
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 32


def json_depth(data: bytes) -> int:
    """Deepest nesting of objects / lists in the JSON text ``data``, counted without parsing it
    (vectorised over the quotes, backslashes and brackets only; brackets inside strings do not
    count); 0 for a scalar."""
    b = np.frombuffer(data, dtype=np.uint8)
    special = np.flatnonzero((b == 34) | (b == 92) | (b == 91) | (b == 93) | (b == 123) | (b == 125))
    if special.size == 0:
        return 0
    ch = b[special]
    i = np.arange(special.size)
    backslash = ch == 92
    # element i continues a run of backslashes when the character just before it is one of them
    cont = np.zeros(special.size, bool)
    cont[1:] = backslash[:-1] & (special[:-1] == special[1:] - 1)
    run_start = np.maximum.accumulate(np.where(cont, 0, i))
    quote = (ch == 34) & ((i - run_start) % 2 == 0)  # preceded by an even number of backslashes
    outside = (np.cumsum(quote, dtype=np.int64) % 2 == 0) & ~quote
    step = np.where(outside & ((ch == 91) | (ch == 123)), 1, 0) - np.where(outside & ((ch == 93) | (ch == 125)), 1, 0)
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def read_json(path: str | os.PathLike[str], what: str = "file", *, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read JSON, turning a missing, damaged, too large or too deeply nested file into one clear line
    naming it (FileNotFoundError / FormatError). Size and depth are checked before parsing, so a
    crafted file can neither exhaust memory nor make the parser recurse (RecursionError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise FormatError(f"{what} {path} is too large ({size} bytes; at most {max_bytes} are read)")
    data = path.read_bytes()[:max_bytes + 1]
    if len(data) > max_bytes:
        raise FormatError(f"{what} {path} is too large (more than {max_bytes} bytes)")
    depth = json_depth(data)
    if depth > max_depth:
        raise FormatError(f"{what} {path} is nested {depth} levels deep (at most {max_depth}): damaged or not a cbir file")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, an integer of > 4300 digits
        raise FormatError(f"{what} {path} is damaged or not JSON: {exc}") from exc
    except RecursionError as exc:  # cannot happen after the depth check; kept as a last guard
        raise FormatError(f"{what} {path} is nested too deeply") from exc


def check_format(
    meta: object, kind: str, supported: tuple[int, ...], path: Path | str, what: str | None = None
) -> None:
    """Check the ``format``/``format_version`` stamp of a saved artefact (``what`` names it in errors)."""
    what = what or f"cbir {kind}"
    if not isinstance(meta, dict) or meta.get("format") != kind:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{path} is not a {what} file (format={found!r})")
    version = meta.get("format_version")
    if version not in supported:
        raise FormatError(
            f"{path}: {what} format version {version!r} is not supported (this cbir reads {supported})"
        )


def save_stamped_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], meta: dict[str, Any],
                     kind: str, version: int) -> None:
    """Atomic ``.npz`` of ``arrays`` plus a JSON ``meta`` entry carrying the format stamp
    (``format=kind``, ``format_version=version``). No pickles: loadable with allow_pickle=False."""
    if "meta" in arrays:
        raise ValueError("'meta' is reserved for the stamp")
    stamp = json.dumps({**meta, "format": kind, "format_version": version})
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(stamp), **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_stamped_npz(path: str | os.PathLike[str], kind: str, supported: tuple[int, ...],
                     what: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of a file written by :func:`save_stamped_npz`; FileNotFoundError when missing,
    FormatError (naming the file and ``what`` it should be) when damaged or of another kind/version.
    ``meta`` comes back without the stamp keys."""
    path = Path(path)
    what = what or f"cbir {kind}"
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise FormatError(f"{path} is not a {what} file (no meta)")
            text = str(z["meta"]).encode()
            if len(text) > MAX_JSON_BYTES or json_depth(text) > MAX_JSON_DEPTH:
                raise FormatError(f"{path}: the meta of this {what} file is too large or too deeply nested")
            meta = json.loads(text)
            check_format(meta, kind, supported, path, what)
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except FormatError:
        raise
    except Exception as exc:  # zip/npy/JSON damage: name the file
        raise FormatError(f"{path} is not a readable {what} file: {exc}") from exc
    meta.pop("format", None)
    meta.pop("format_version", None)
    return arrays, meta
