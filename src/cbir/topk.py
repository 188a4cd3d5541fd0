"""Exact top-k inner-product search over a database read in chunks: bounded memory at any N.

    scores, rows = chunked_topk(q, db, k=1000)                        # db: (N, D) array or np.memmap
    scores, rows = chunked_topk(q, ((0, a), (len(a), b)), k=1000)     # or (offset, block) pieces
    scores, rows = chunked_topk(q, db, k=1000, device="cuda")         # fp16 matmul + torch.topk

The score of query i and database row j is the inner product ``S[i, j] = <q_i, x_j>`` (the cosine
for L2-normalised rows). Only one block of ``chunk_rows`` database rows and its (nq, chunk_rows)
scores are held at a time; a running top-k of every query is merged with each block's top-k.

Order (the same as :func:`cbir.evaluation.rank_from_scores`): descending score, ties broken by
ascending database row. It is made exact and deterministic — also on the GPU, whose
``torch.topk`` breaks ties arbitrarily — by selecting on one int64 key per score,
``key = u(s) * 2^31 + (2^31 - 1 - j)``, where ``u`` maps a float32 to a uint32 in the same order
(IEEE sign-magnitude turned into an unsigned ordering; -0.0 counts as 0.0). Keys are unique, so
the k largest keys are exactly the first k entries of the full stable ranking, whatever the
chunking or the order in which blocks arrive. Rows must be < 2^31.

Memory: a memory-mapped block stays counted in the process's resident memory (RSS) as long as its
pages are mapped in; after each block has been scored its pages are handed back to the kernel
(``madvise(MADV_DONTNEED)``: they stay in the page cache, the process no longer holds them), so a
1M x 2048 file is streamed with a peak RSS of a few blocks.
"""

from __future__ import annotations

import mmap
from typing import Callable, Iterable, Iterator, Tuple, Union

import numpy as np

Block = Tuple[int, np.ndarray]
Database = Union[np.ndarray, Iterable[Block]]

_IDX_BITS = 31
_IDX_MAX = (1 << _IDX_BITS) - 1
DEFAULT_CHUNK_BYTES = 1 << 26  # float32 bytes of one block (64 MiB)


def default_chunk_rows(dim: int, nbytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per block so that a float32 block is about ``nbytes`` (at least 1024 rows)."""
    return max(1024, nbytes // (4 * max(int(dim), 1)))


# --------------------------------------------------------------------------------------------
# ordering keys
# --------------------------------------------------------------------------------------------


def order_keys(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """int64 keys (nq, m) whose descending order is (score desc, row asc); scores float32 (nq, m),
    rows int64 (m,) or (nq, m) global database rows in [0, 2^31). NaN scores are refused."""
    s = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; a ranking is undefined (NaN in the descriptors?)")
    b = s.view(np.int32).astype(np.int64)
    u = np.where(b >= 0, b + (1 << 31), -1 - b)  # monotonic float32 -> [0, 2^32)
    return (u << _IDX_BITS) | (_IDX_MAX - np.asarray(rows, dtype=np.int64))


def keys_to_rows(keys: np.ndarray) -> np.ndarray:
    """The database rows encoded in :func:`order_keys` keys."""
    return _IDX_MAX - (keys & _IDX_MAX)


def keys_to_scores(keys: np.ndarray) -> np.ndarray:
    """The float32 scores encoded in :func:`order_keys` keys (exact)."""
    u = keys >> _IDX_BITS
    b = np.where(u >= (1 << 31), u - (1 << 31), -1 - u).astype(np.int32)
    return b.view(np.float32)


def _top_keys_np(keys: np.ndarray, k: int) -> np.ndarray:
    """The k largest keys of each row, sorted descending; (nq, m) -> (nq, min(k, m))."""
    m = keys.shape[1]
    if k < m:
        keys = np.take_along_axis(keys, np.argpartition(-keys, k - 1, axis=1)[:, :k], axis=1)
    out = -np.sort(-keys, axis=1)
    return out[:, : int((out >= 0).sum(axis=1).min(initial=out.shape[1]))] if out.size and out[:, -1].min() < 0 else out


# --------------------------------------------------------------------------------------------
# reading blocks with bounded resident memory
# --------------------------------------------------------------------------------------------


def _mmap_of(arr: np.ndarray) -> mmap.mmap | None:
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def release_pages(arr: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped array (or view) from this process.

    The file's pages stay in the kernel's page cache; the mapping stays valid (a later read faults
    them in again). No-op for arrays that are not file-backed memory maps, or where the platform
    has no ``madvise``.
    """
    mm = _mmap_of(arr) if isinstance(arr, np.ndarray) else None
    if mm is None or not hasattr(mm, "madvise") or getattr(mm, "closed", False):
        return
    if arr.size == 0 or not arr.flags.c_contiguous:
        return
    try:
        start_addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return
    lo = arr.ctypes.data - start_addr
    hi = lo + arr.nbytes
    page = mmap.PAGESIZE
    lo = (lo // page) * page
    hi = min(len(mm), -(-hi // page) * page)
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError, AttributeError):
            pass


def iter_blocks(db: Database, chunk_rows: int | None = None) -> Iterator[Block]:
    """(offset, block) pieces of a database: an (N, D) array (np.memmap too) is cut into blocks
    of ``chunk_rows`` rows; an object with ``iter_chunks(rows)`` (a :class:`cbir.descriptors.Descriptors`,
    a sharded descriptor array) is asked for its blocks; an iterable of (offset, block) pairs is
    passed through."""
    if isinstance(db, np.ndarray):
        if db.ndim != 2:
            raise ValueError(f"the database must be a 2-D array (N x D), got shape {db.shape}")
        step = chunk_rows or default_chunk_rows(db.shape[1])
        for s in range(0, db.shape[0], step):
            yield s, db[s:s + step]
        return
    if hasattr(db, "iter_chunks"):  # cbir.descriptors: a Descriptors or a sharded array
        step = chunk_rows or default_chunk_rows(getattr(db, "dim", None) or db.shape[1])
        yield from ((int(o), b) for o, b in db.iter_chunks(step))
        return
    if hasattr(db, "vectors") and isinstance(getattr(db, "vectors"), np.ndarray):  # a Descriptors
        yield from iter_blocks(db.vectors, chunk_rows)
        return
    for item in db:
        try:
            off, block = item
        except (TypeError, ValueError) as exc:
            raise ValueError("a database given as an iterable must yield (offset, block) pairs") from exc
        yield int(off), block


# --------------------------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------------------------


def chunked_topk(
    q: np.ndarray,
    db: Database,
    k: int,
    *,
    chunk_rows: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``S = q dbᵀ`` per query, best first, scanning the database block by block.

    q: (nq, D) float queries (used as given: normalise them first for cosine similarity).
    db: (N, D) array or np.memmap (read in blocks of ``chunk_rows`` rows, default ~64 MiB of
    float32), a ``Descriptors`` (its ``iter_chunks`` or its memory-mapped ``vectors``), or an iterable of ``(offset, block)`` with block (m, D) holding database rows
    offset .. offset+m-1 (blocks in any order; they should not overlap).
    device: ``"cpu"`` (numpy float32 matrix products) or ``"cuda"``/``"cuda:N"`` (torch; the query
    and each block go to the GPU in ``dtype``, default float16: a half-precision matrix product
    with float32 accumulation, then ``torch.topk`` of the block's keys).
    dtype: compute precision, ``"float32"`` or ``"float16"`` (default: float32 on the CPU, float16
    on CUDA). transform: applied to each float32 block before scoring (e.g. ``l2_normalize`` or a
    whitening's ``apply``; it must act on rows independently).

    Returns (scores (nq, k') float32, rows (nq, k') int64) with k' = min(k, N): the first k'
    columns of the full ranking in the order (score desc, row asc) — for the same scores, equal to
    ``rank_from_scores(q @ db.T, top_k=k)``. On the GPU the scores are the fp16 products, so the
    ranking is that of the fp16 scores.
    """
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"queries must be a 2-D array (nq x D), got shape {q.shape}")
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = int(k)
    dev = str(device)
    cuda = dev.startswith("cuda")
    if dtype is None:
        dtype = "float16" if cuda else "float32"
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but torch sees no GPU")
        return _chunked_topk_torch(q, db, k, chunk_rows, dev, dtype, transform)
    if dtype != "float32":
        raise ValueError("on the CPU the scores are computed in float32 (float16 is for device='cuda')")
    if dev != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")

    qf = np.ascontiguousarray(q, dtype=np.float32)
    nq, d = qf.shape
    best = np.zeros((nq, 0), dtype=np.int64)
    for off, block in iter_blocks(db, chunk_rows):
        x = _check_block(block, off, d if transform is None else None)
        if x.shape[0] == 0:
            continue
        xf = _as_float32(x)
        release_pages(block)
        if transform is not None:
            xf = np.asarray(transform(xf), dtype=np.float32)
        _check_dim(xf, x.shape[0], off, d)
        s = qf @ xf.T  # (nq, m)
        best = _top_keys_np(np.concatenate([best, _candidates(s, off, k, best)], axis=1), k)
    return keys_to_scores(best), keys_to_rows(best)


def _candidates(s: np.ndarray, off: int, k: int, best: np.ndarray) -> np.ndarray:
    """Keys (nq, c) of the block's scores that can still enter the top k, padded with -1 (below any
    key). A score below a lower bound of the k-th best score of the union cannot: the bound is the
    k-th best kept so far (once k are kept) or the block's own k-th largest; equal scores stay."""
    nq, m = s.shape
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; a ranking is undefined (NaN in the descriptors?)")
    if best.shape[1] >= k:
        thr = keys_to_scores(best[:, k - 1])
    elif m > k:
        thr = np.partition(s, m - k, axis=1)[:, m - k]
    else:
        thr = np.full(nq, -np.inf, dtype=np.float32)
    qi, col = np.nonzero(s >= thr[:, None])  # row-major: grouped by query
    keys = order_keys(s[qi, col][None, :], (col + off)[None, :])[0]
    counts = np.bincount(qi, minlength=nq)
    out = np.full((nq, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    pos = np.arange(qi.size) - np.repeat(np.cumsum(counts) - counts, counts)
    out[qi, pos] = keys
    return out


def _as_float32(x: np.ndarray) -> np.ndarray:
    """A private float32 copy of a block (memory-mapped pages are released after the copy)."""
    xf = np.ascontiguousarray(x, dtype=np.float32)
    return np.array(xf) if xf is x and _mmap_of(x) is not None else xf


def _check_block(block, off: int, d: int | None) -> np.ndarray:
    x = np.asarray(block)
    if x.ndim != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"database block at row {off} has shape {x.shape}; expected (m, {d or 'D'})")
    if off < 0 or off + x.shape[0] - 1 > _IDX_MAX:
        raise ValueError(f"database rows must lie in [0, 2^31); block at {off} of {x.shape[0]} rows")
    return x


def _check_dim(x: np.ndarray, m: int, off: int, d: int) -> None:
    if x.shape != (m, d):
        raise ValueError(f"the transform made a block at row {off} of shape {x.shape}; the queries are {d}-D")


def _order_keys_torch(s, rows):
    """torch version of :func:`order_keys`: s (nq, m) float32 tensor, rows (m,) int64 tensor."""
    import torch

    s = s.float() + 0.0
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN; a ranking is undefined (NaN in the descriptors?)")
    b = s.view(torch.int32).to(torch.int64)
    u = torch.where(b >= 0, b + (1 << 31), -1 - b)
    return (u << _IDX_BITS) | (_IDX_MAX - rows)[None, :]


def _chunked_topk_torch(q, db, k, chunk_rows, device, dtype, transform):
    """The torch path of :func:`chunked_topk` (any torch device; the public function sends only CUDA here)."""
    import torch

    dev = torch.device(device)
    tdtype = torch.float16 if dtype == "float16" else torch.float32
    nq, d = q.shape
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(dev).to(tdtype)
    best = torch.zeros((nq, 0), dtype=torch.int64, device=dev)
    with torch.inference_mode():
        for off, block in iter_blocks(db, chunk_rows):
            x = _check_block(block, off, d if transform is None else None)
            if x.shape[0] == 0:
                continue
            if transform is not None:
                x = np.asarray(transform(np.asarray(x, dtype=np.float32)), dtype=np.float32)
                _check_dim(x, x.shape[0], off, d)
            host = torch.from_numpy(np.ascontiguousarray(x))
            xt = host.to(dev, non_blocking=False).to(tdtype)
            release_pages(block)
            s = qt @ xt.T
            rows = torch.arange(off, off + x.shape[0], dtype=torch.int64, device=dev)
            keys = _order_keys_torch(s, rows)
            kk = min(k, keys.shape[1])
            cand = torch.topk(keys, kk, dim=1, largest=True, sorted=False).values
            merged = torch.cat([best, cand], dim=1)
            best = torch.topk(merged, min(k, merged.shape[1]), dim=1, largest=True, sorted=True).values
    keys = best.cpu().numpy()
    return keys_to_scores(keys), keys_to_rows(keys)
