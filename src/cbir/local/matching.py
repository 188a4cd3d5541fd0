"""Descriptor matching: nearest neighbour with Lowe's ratio test, a distance cap and a cross check.

The rule is COLMAP's brute-force SIFT matcher (``SiftMatchingOptions``; ``FindBestMatchesBruteForce``
in COLMAP's ``feature/sift.cc``). With descriptors in COLMAP's byte form (norm ~512), for a feature
a of image 1 and the features b of image 2::

    s1 >= s2 >= 0 the two largest inner products a . b (0 when there are fewer),
    d(s) = arccos(min(s / 512^2, 1))                     (the angle between the descriptors)
    a -> b1  kept  iff  s1 > 0,  d(s1) <= max_distance  and  d(s1) < max_ratio * d(s2)

and with ``cross_check`` a pair (a, b) is a match iff a -> b and b -> a both hold (the same rule
from image 2 to image 1). Defaults: max_ratio 0.8, max_distance 0.7 (COLMAP's).

Two implementations give the same matches:

- :func:`match` one pair through ``pycolmap.FeatureMatcher`` (brute force, CPU or CUDA);
- :func:`match_many` one query against many candidates in a few large matrix products (torch,
  float32: inner products of byte vectors are integers < 2^24, hence exact). Per chunk of
  candidates padded with zero rows to one length, S = Q C^T (k, Nq, Nc) and::

      row best  r1, j*  = max_j S[i, j]           column best c1 = max_i S[i, j]
      mutual(i)  = r1(i) > 0 and r1(i) == c1(j*(i))  (i is then the best of column j*)
      set S[i, j*(i)] = -1 for mutual i; then  r2 = max_j S[i, j],  c2(j*) = max_i S[i, j*]

  which are the second largest values of row i and of column j* (a tie at the column's best,
  two mutual rows for one column, is refused, as COLMAP's ratio test refuses it). Padding rows
  have inner product 0, which the rule treats as "no feature". pycolmap's CPU matcher compares
  every pair in a scalar loop and holds the GIL: :func:`match_many` is the fast path (see
  ``benchmarks/local_features.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .features import LocalFeatures, pycolmap_device, quiet_pycolmap

if TYPE_CHECKING:
    import torch

__all__ = ["MatchSettings", "match", "match_many", "SQ_NORM"]

#: Squared norm of a descriptor in COLMAP's byte form.
SQ_NORM = 512.0 * 512.0
#: Elements of the score block (k, Nq, Nc) computed at once by :func:`match_many` (float32: 256 MB).
BLOCK_ELEMENTS = 1 << 26


class MatchSettings(BaseModel):
    """COLMAP's ``SiftMatchingOptions``: ratio test, distance cap (radians), cross check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_ratio: float = Field(0.8, gt=0.0, le=1.0)
    max_distance: float = Field(0.7, gt=0.0, le=float(np.pi))
    cross_check: bool = True


def match(f1: LocalFeatures, f2: LocalFeatures, settings: MatchSettings | None = None, *,
          device: str = "auto") -> np.ndarray:
    """Matches (M, 2) int64 of feature indices (row in f1, row in f2) through pycolmap's matcher
    (brute force), ordered by the index in f1."""
    import pycolmap

    settings = settings or MatchSettings()
    if len(f1) == 0 or len(f2) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    quiet_pycolmap()
    opts = pycolmap.FeatureMatchingOptions()
    opts.num_threads = 1
    opts.max_num_matches = max(len(f1), len(f2))
    opts.sift.max_ratio = float(settings.max_ratio)
    opts.sift.max_distance = float(settings.max_distance)
    opts.sift.cross_check = bool(settings.cross_check)
    opts.sift.cpu_brute_force_matcher = True
    dev = pycolmap_device(device)
    opts.use_gpu = device == "cuda" or (device == "auto" and pycolmap.has_cuda)
    matcher = pycolmap.FeatureMatcher.create(opts, dev)
    sift = pycolmap.FeatureExtractorType.SIFT
    d1 = pycolmap.FeatureDescriptors(sift, np.ascontiguousarray(f1.descriptors))
    d2 = pycolmap.FeatureDescriptors(sift, np.ascontiguousarray(f2.descriptors))
    out = np.asarray(matcher.match(None, d1, None, d2), dtype=np.int64).reshape(-1, 2)
    return out[np.argsort(out[:, 0], kind="stable")]


def _torch_device(device: str) -> "torch.device":
    from ..device import resolve_device

    return resolve_device(device)


def _passes(best: "torch.Tensor", second: "torch.Tensor", settings: MatchSettings) -> "torch.Tensor":
    """The distance cap and ratio test on inner products (float32, as COLMAP computes them)."""
    import torch

    inv = torch.tensor(1.0 / SQ_NORM, dtype=torch.float32)
    d1 = torch.acos(torch.clamp(best * inv, max=1.0))
    d2 = torch.acos(torch.clamp(torch.clamp(second, min=0.0) * inv, max=1.0))
    return (best > 0) & (d1 <= settings.max_distance) & (d1 < settings.max_ratio * d2)


def match_many(query: LocalFeatures, candidates: Sequence[LocalFeatures], settings: MatchSettings | None = None,
               *, device: str = "auto", block_elements: int = BLOCK_ELEMENTS) -> list[np.ndarray]:
    """The matches (M_k, 2) int64 (query row, candidate row) of ``query`` with every candidate, by
    the rule of :func:`match` (same matches), computed in blocks of candidates with torch."""
    import torch

    settings = settings or MatchSettings()
    dev = _torch_device(device)
    out: list[np.ndarray] = [np.zeros((0, 2), dtype=np.int64) for _ in candidates]
    nq = len(query)
    if nq == 0:
        return out
    q = torch.from_numpy(np.ascontiguousarray(query.descriptors)).to(dev).float()
    order = [i for i in np.argsort([len(c) for c in candidates], kind="stable") if len(candidates[i]) > 0]
    start = 0
    while start < len(order):
        # a block of candidates of similar size (sorted), at most block_elements scores
        nc = len(candidates[order[start]])
        stop = start + 1
        while stop < len(order):
            width = len(candidates[order[stop]])
            if (stop - start + 1) * nq * width > block_elements:
                break
            nc, stop = width, stop + 1
        block = order[start:stop]
        start = stop
        nc = max(len(candidates[i]) for i in block)
        c = torch.zeros((len(block), nc, candidates[block[0]].descriptors.shape[1]), dtype=torch.float32, device=dev)
        for b, i in enumerate(block):
            d = candidates[i].descriptors
            c[b, : d.shape[0]] = torch.from_numpy(np.ascontiguousarray(d)).to(dev).float()
        for b, pairs in zip(block, _match_block(q, c, settings)):
            out[b] = pairs
    return out


def _match_block(q: "torch.Tensor", c: "torch.Tensor", settings: MatchSettings) -> list[np.ndarray]:
    """Matches of q (Nq, 128) with each of the k zero-padded candidates c (k, Nc, 128)."""
    import torch

    k = c.shape[0]
    s = torch.matmul(q, c.transpose(1, 2))  # (k, Nq, Nc) exact integer inner products
    r1, jstar = s.max(dim=2)  # (k, Nq)
    if not settings.cross_check:
        s.scatter_(2, jstar.unsqueeze(2), -1.0)
        r2 = s.amax(dim=2)
        keep = _passes(r1, r2, settings)
        return _pairs(keep, jstar)
    c1 = s.amax(dim=1)  # (k, Nc)
    mutual = (r1 > 0) & (r1 == torch.gather(c1, 1, jstar))
    # two mutual rows for one column = a tie at that column's best: refused (COLMAP's ratio test does)
    col_hits = torch.zeros_like(c1).scatter_add_(1, jstar, mutual.float())
    mutual &= torch.gather(col_hits, 1, jstar) == 1
    bi, qi = torch.nonzero(mutual, as_tuple=True)
    ji = jstar[bi, qi]
    s[bi, qi, ji] = -1.0
    r2 = s.amax(dim=2)  # second best of each mutual row
    c2 = torch.gather(s.amax(dim=1), 1, jstar)  # second best of the column each row points to
    keep = mutual & _passes(r1, r2, settings) & _passes(r1, c2, settings)
    del s
    return _pairs(keep, jstar, k)


def _pairs(keep: "torch.Tensor", jstar: "torch.Tensor", k: int | None = None) -> list[np.ndarray]:
    keep_np = keep.cpu().numpy()
    j_np = jstar.cpu().numpy()
    out = []
    for b in range(keep_np.shape[0] if k is None else k):
        rows = np.flatnonzero(keep_np[b])
        out.append(np.stack([rows, j_np[b, rows]], axis=1).astype(np.int64))
    return out

