"""Exact (brute-force) inner-product search: a matrix product and a top-k, on CPU or GPU via torch.

For L2-normalised descriptors the inner product is the cosine similarity, so the k largest
scores of ``S = Q Xᵀ`` are the k nearest neighbours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..device import resolve_device

if TYPE_CHECKING:  # torch is imported when a search needs it (index info, add, remove and save do not)
    import torch

__all__ = ["resolve_device", "database_tensor", "exact_topk", "numpy_search", "NUMPY_MAX_FLOATS"]

#: An exact index up to this many stored floats (N x D; 256 MB of float32) is searched with numpy
#: on ``device="auto"`` when torch is not loaded yet: importing torch (~1.6 s) and starting a GPU
#: would take longer than the whole product on the CPU.
NUMPY_MAX_FLOATS = 1 << 26


def numpy_search(device: str, n: int, dim: int) -> bool:
    """True when an exact search on ``device`` runs in numpy (``"cpu"``; ``"auto"`` for a small
    index while torch is not imported) rather than torch."""
    import sys

    if str(device) == "cpu":
        return True
    return str(device) == "auto" and "torch" not in sys.modules and n * dim <= NUMPY_MAX_FLOATS


def database_tensor(vectors: np.ndarray, device: "torch.device") -> "torch.Tensor":
    """The (N, D) database as a tensor: zero-copy float32 on CPU, float16 on the GPU (half the memory, tensor cores)."""
    import torch

    import warnings

    with warnings.catch_warnings():  # a read-only (memory-mapped) store: the tensor is only ever read
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    if device.type != "cuda":
        return x
    out = torch.empty(x.shape, dtype=torch.float16, device=device)
    step = max(1, (1 << 26) // max(x.shape[1], 1))  # upload in ~256 MB float32 pieces
    for s in range(0, x.shape[0], step):
        out[s:s + step] = x[s:s + step].to(device).half()
    return out


def exact_topk(
    queries: np.ndarray, database: "torch.Tensor", k: int, *, max_scores: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``S = Q Xᵀ`` per query row, best first.

    queries (nq, D) float; database (N, D) tensor from :func:`database_tensor`.
    Returns (scores (nq, k') float32, rows (nq, k') int64) with k' = min(k, N). Queries are
    processed in chunks so that at most ``max_scores`` scores are held at once (default 2^25 on the
    CPU, 2^28 = 512 MB of fp16 on the GPU, where large matrix products run fastest).
    """
    import torch

    n = int(database.shape[0])
    nq = int(queries.shape[0])
    kk = min(int(k), n)
    if kk <= 0 or nq == 0:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    q = q.to(device=database.device, dtype=database.dtype)
    if max_scores is None:
        max_scores = 1 << (28 if database.device.type == "cuda" else 25)
    chunk = max(1, max_scores // max(n, 1))
    out_s, out_i = [], []
    with torch.inference_mode():
        for start in range(0, nq, chunk):
            s = q[start : start + chunk] @ database.T
            v, i = torch.topk(s, kk, dim=1, largest=True, sorted=True)
            out_s.append(v.float().cpu())
            out_i.append(i.cpu())
    return torch.cat(out_s).numpy(), torch.cat(out_i).numpy().astype(np.int64)
