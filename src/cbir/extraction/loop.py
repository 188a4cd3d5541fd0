"""The extraction loop: batches -> every scale -> ``net.pool`` -> scales combined -> ``net.head``.

Per image: decoded and shrunk (:mod:`.images`), ImageNet-normalised; for each scale s the batch is
resized bilinearly (antialiased) by s, each side kept at least ``MIN_SIDE`` px (:func:`scaled_size`);
``net.pool`` (backbone + pooling + L2); the scales are combined by a generalized mean
v = (1/S Σ_s v_s^p)^(1/p) (p = GeM's p, else 1) then L2 (:func:`combine_scales`); ``net.head``
(whitening + L2, if any).

Speed: on CUDA bf16 autocast, channels_last, batches of 16, decoding workers (and JPEG decoding on
the GPU with ``decode="cuda"``). On the CPU: ONNX Runtime in fp32 where installed (the "auto"
backend, :mod:`.backends`; its converted network cached on disk), batch 1, the next image decoded
in a thread while this one is described (:func:`.batching.prefetched`); the torch backend adds
channels_last and bf16 autocast when the CPU computes bf16 natively (AMX / AVX512-BF16).
See benchmarks/extract.py and docs/extraction.md for the measurements.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..device import autocast, resolve_device
from .batching import batch_defaults, iter_batches, prefetched, prepare_model
from .images import MIN_SIDE, Box, label, scaled_size

__all__ = ["DEFAULT_SCALES", "ExtractResult", "extract", "describe", "pyramid", "combine_scales", "rescale",
           "check_scales"]

DEFAULT_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)


@dataclass
class ExtractResult:
    """``vectors[i]`` describes input ``ok[i]``; ``failed`` lists the inputs that could not be read."""

    vectors: np.ndarray
    ok: np.ndarray
    failed: list[dict[str, str]] = field(default_factory=list)
    backend: str = "torch"  #: the inference backend that ran (:func:`cbir.extraction.backends.select_backend`)
    precision: str = "fp32"  #: the precision it computed in


def combine_scales(v: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """Generalized mean over scales then L2: (S, B, D) -> (B, D), (1/S Σ_s v_s^p)^(1/p) / ||·||₂.

    p ≠ 1 needs non-negative inputs (GeM outputs are); they are clamped at 0 in that case.
    """
    if p == 1.0:
        out = v.mean(dim=0)
    else:
        out = v.clamp(min=0).pow(p).mean(dim=0).pow(1.0 / p)
    return F.normalize(out, dim=-1)


def rescale(x: torch.Tensor, scale: float, min_side: int = MIN_SIDE) -> torch.Tensor:
    """(B,3,H,W) resized by ``scale`` (bilinear, antialiased), each side at least ``min_side`` (:func:`scaled_size`).

    When no side needs raising this is exactly ``F.interpolate(x, scale_factor=scale)`` (and ``x``
    itself at scale 1), so ordinary images get the same descriptors as without the rule.
    """
    (hs, ws), exact = scaled_size(x.shape[-2], x.shape[-1], scale, min_side)
    if exact:
        if scale == 1.0:
            return x
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(x, size=(hs, ws), mode="bilinear", align_corners=False, antialias=True)


def pyramid(x: torch.Tensor, scales: Sequence[float]) -> list[torch.Tensor]:
    """``x`` at every scale (:func:`rescale`): what :func:`describe` runs the network on."""
    return [rescale(x, s) for s in scales]


def describe(model, x: torch.Tensor, scales: Sequence[float], p: float, *,
             pool: Callable[[torch.Tensor], torch.Tensor] | None = None, channels_last: bool = True,
             scaled: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """(B,3,H,W) normalised images -> (B,D) float32 descriptors: every scale (:func:`rescale`) through
    ``pool`` (default ``model.pool``), combined by :func:`combine_scales` with exponent ``p``, then ``model.head``.
    ``scaled``: :func:`pyramid` of ``x`` already computed (e.g. in the decoding thread)."""
    pool = model.pool if pool is None else pool
    per_scale = []
    for i, s in enumerate(scales):
        xs = rescale(x, s) if scaled is None else scaled[i]
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        per_scale.append(pool(xs).float())
    v = per_scale[0] if len(scales) == 1 else combine_scales(torch.stack(per_scale), p)
    return model.head(v).float()


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 or not math.isfinite(s) for s in scales):
        raise ValueError(f"scales must be positive, got {scales}")
    return scales


def extract(
    model,
    images: Sequence[str | os.PathLike[str] | bytes],
    *,
    imsize: int | None = 1024,
    scales: Sequence[float] = DEFAULT_SCALES,
    bboxes: Sequence[Box | None] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    workers: int | None = None,
    progress: bool = True,
    strict: bool = False,
    channels_last: bool = True,
    precision: str = "auto",
    decode: str = "auto",
    backend: str = "auto",
    prefetch: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Descriptors of ``images`` (files, or images' bytes) with RetrievalNet ``model`` (moved to ``device``, eval mode).

    Returns ExtractResult(vectors (N_ok, D) float32 L2-normalised, ok (N_ok,) input indices,
    failed [{"path", "reason"}]). ``strict=True`` raises ImageError at the first unreadable image.
    ``precision``: "auto" (fp32 through ONNX Runtime on the CPU where it is installed; else bf16 autocast on
    CUDA and on CPUs with native bf16, fp32 elsewhere), "fp32", "bf16". ``ExtractResult.backend`` and
    ``.precision`` say what ran.
    ``decode``: "auto" (= "cuda" on a CUDA device: JPEGs decoded on the GPU; else "cpu"), "cpu", "cuda".
    ``backend``: "auto" (ONNX Runtime fp32 on the CPU where installed, else torch; see
    :func:`cbir.extraction.backends.resolve_backend`), "torch", "onnxruntime", "openvino".
    ``prefetch``: on the CPU without decoding workers, decode the next batch and resize it to every scale
    in a thread while this one is described (same descriptors).
    ``on_progress(n)`` is called with the number of images just described. The model is left on
    ``device`` (in channels_last when that is on) and in the train/eval mode it came in.
    """
    paths = [p if isinstance(p, (bytes, bytearray)) else Path(p) for p in images]  # bytes: an image in memory
    if bboxes is None:
        bboxes = [None] * len(paths)
    if len(bboxes) != len(paths):
        raise ValueError(f"{len(bboxes)} crop boxes for {len(paths)} images")
    scales = check_scales(scales)
    if getattr(model.pooling, "name", "") == "bow" and not bool(model.pooling.fitted):
        raise ValueError("BoW pooling needs a codebook: fit_bow(model, images) first or pass --codebook FILE")
    dev = resolve_device(device)
    if decode == "auto":
        decode = "cuda" if dev.type == "cuda" else "cpu"
    batch_size, workers = batch_defaults(dev, batch_size, workers)
    was_training = model.training
    from .backends import select_backend

    prepare_model(model, dev, False)  # eval mode, on dev: what a backend converts
    pool, backend, amp = select_backend(model, dev, backend, precision)
    channels_last = channels_last and backend == "torch"  # the other backends take contiguous NCHW arrays
    prepare_model(model, dev, channels_last)
    p = model.multiscale_p()
    failed_idx: list[tuple[int, str]] = []
    out: dict[int, np.ndarray] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), unit="img", desc="extract", dynamic_ncols=True)
    try:
        batches = iter_batches(paths=paths, bboxes=bboxes, imsize=imsize, mean=model.mean, std=model.std,
                               batch_size=batch_size, workers=workers, failed=failed_idx, strict=strict,
                               pin=dev.type == "cuda", decode=decode, device=dev)
        ahead = workers == 0 and dev.type == "cpu" and prefetch
        if ahead:  # decoding, normalising and every scale's resize of the next batch run in a thread
            batches = prefetched((idx, x, pyramid(x, scales)) for idx, x in batches)
        with torch.inference_mode(), autocast(dev, amp if backend == "torch" else "fp32"):
            for item in batches:
                idx, x = item[0], item[1]
                v = describe(model, x.to(dev, non_blocking=True), scales, p, pool=pool, channels_last=channels_last,
                             scaled=item[2] if ahead else None).cpu().numpy()
                for j, i in enumerate(idx):
                    out[i] = v[j]
                if bar is not None:
                    bar.update(len(idx))
                if on_progress is not None:
                    on_progress(len(idx))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.update(len(paths) - bar.n)
            bar.close()
    ok = np.array(sorted(out), dtype=np.int64)
    dim = model.dim
    vectors = np.stack([out[i] for i in ok]).astype(np.float32) if len(ok) else np.zeros((0, dim), np.float32)
    failed = [{"path": label(paths[i]), "reason": r} for i, r in sorted(failed_idx)]
    return ExtractResult(vectors=vectors, ok=ok, failed=failed, backend=backend, precision=amp)
