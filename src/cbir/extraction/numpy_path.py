"""The extraction arithmetic without torch: pixels -> normalised array -> every scale -> combined.

The same numbers as :mod:`.images` + :mod:`.loop` (decoding, the ``imsize`` shrink, the 32 px
minimum side, the antialiased bilinear rescale, the generalized mean over scales, L2), written
with numpy so that a query can be described by an exported network (ONNX Runtime,
:mod:`cbir.index.onnx_query`) in a process that never imports torch (``import torch`` alone takes
~1.6 s). Decoding, crop and the bicubic shrink are :func:`.images.load_image` and
:func:`.images.resized_pixels` themselves (PIL); only the tensor steps are mirrored here, each
tested against the torch function it mirrors (tests/test_numpy_path.py).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from .images import MIN_SIDE, scaled_size

__all__ = ["normalise", "aa_bilinear_weights", "rescale", "combine_scales", "describe_array"]


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 ``(x / 255 - mean) / std`` (as :func:`.images.pixels_tensor`)."""
    x = np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8).transpose(2, 0, 1)).astype(np.float32)
    x /= np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (x - m) / s


@lru_cache(maxsize=64)
def aa_bilinear_weights(n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in) float32 matrix of the antialiased bilinear resize along one axis.

    The filter of ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` (and of
    PIL's bilinear reduce): with the sampling step r = 1/scale (``scale`` given, as with
    ``scale_factor``) or n_in/n_out, output pixel i is centred at c = r (i + 0.5) in input
    coordinates; when shrinking (r >= 1) the triangle filter is widened to support r:
    w_ij ∝ max(0, 1 - |j + 0.5 - c| / max(r, 1)) over j in [trunc(c - R + 0.5), trunc(c + R + 0.5)),
    R = max(r, 1), clipped to the image, and each row normalised to sum 1. Computed in float32
    step by step as torch's CPU kernel does (r, c, R and the weights are float32), so that the
    weights agree to the last bits rather than to 1e-5.
    """
    f32, f64 = np.float32, np.float64
    r = f32(1.0 / scale) if scale is not None and scale > 0 else f32(n_in / n_out)
    support = r if r >= 1.0 else f32(1.0)
    inv = f32(1.0 / float(r)) if r >= 1.0 else f32(1.0)
    c = (float(r) * (np.arange(n_out) + 0.5)).astype(f32)  # centres
    lo = np.maximum(((c - support).astype(f64) + 0.5).astype(np.int64), 0)  # int(): truncation, as in C
    hi = np.minimum(((c + support).astype(f64) + 0.5).astype(np.int64), n_in)
    taps = int(math.ceil(float(support))) * 2 + 1
    j = lo[:, None] + np.arange(taps)[None, :]
    x = np.abs(((j.astype(f32) - c[:, None]).astype(f64) + 0.5) * float(inv)).astype(f32)
    t = np.where((j < hi[:, None]) & (x < 1.0), (1.0 - x.astype(f64)).astype(f32), f32(0.0))
    total = np.add.accumulate(t, axis=1, dtype=f32)[:, -1:]  # a sequential float32 sum, as the kernel adds
    t = np.divide(t, total, out=np.zeros_like(t), where=total != 0)
    w = np.zeros((n_out, n_in + taps), dtype=f32)
    np.put_along_axis(w, j, t, axis=1)
    return np.ascontiguousarray(w[:, :n_in])


def rescale(x: np.ndarray, scale: float, min_side: int = MIN_SIDE) -> np.ndarray:
    """(3, H, W) float32 resized by ``scale`` exactly as :func:`cbir.extraction.loop.rescale`: sides
    floor(H s), floor(W s), a side below ``min_side`` raised to it; antialiased bilinear
    (:func:`aa_bilinear_weights`, separable: ``Wh @ x_c @ Wwᵀ``); scale 1 returns ``x``."""
    h, w = x.shape[-2:]
    (hs, ws), exact = scaled_size(h, w, scale, min_side)
    if exact and scale == 1.0:
        return x
    given = float(scale) if exact else None  # scale_factor given to torch, else a target size
    wh = aa_bilinear_weights(h, hs, given)
    ww = aa_bilinear_weights(w, ws, given)
    return np.ascontiguousarray(np.matmul(np.matmul(wh, x), ww.T), dtype=np.float32)


def combine_scales(v: np.ndarray, p: float = 1.0) -> np.ndarray:
    """Generalized mean over scales then L2: (S, D) -> (D,), (1/S Σ_s v_s^p)^(1/p) / ||·||₂
    (as :func:`cbir.extraction.loop.combine_scales`; p ≠ 1 clamps at 0 first)."""
    v = np.asarray(v, dtype=np.float32)
    if p == 1.0:
        out = v.mean(axis=0)
    else:
        out = np.power(np.power(np.clip(v, 0.0, None), np.float32(p)).mean(axis=0), np.float32(1.0 / p))
    return l2(out)


def l2(v: np.ndarray) -> np.ndarray:
    """v / max(||v||₂, 1e-12) along the last axis (``F.normalize``)."""
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), np.float32(1e-12))


def describe_array(x: np.ndarray, scales: Sequence[float], p: float,
                   pool: Callable[[np.ndarray], np.ndarray],
                   head: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(3, H, W) normalised image -> (D,) descriptor: each scale (:func:`rescale`) through ``pool``
    ((1, 3, h, w) -> (1, D) pooled, L2-normalised), combined by :func:`combine_scales` with exponent
    ``p`` (one scale: taken as is), then ``head`` (whitening + L2) when given. As
    :func:`cbir.extraction.loop.describe` for one image."""
    per = [np.asarray(pool(rescale(x, float(s))[None]), dtype=np.float32)[0] for s in scales]
    v = per[0] if len(per) == 1 else combine_scales(np.stack(per), p)
    return v if head is None else head(v)


def check_finite_scales(scales: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(s) for s in scales)
    if not out or any(not s > 0 or not math.isfinite(s) for s in out):
        raise ValueError(f"scales must be positive, got {out}")
    return out
