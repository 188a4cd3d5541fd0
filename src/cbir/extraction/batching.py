"""Batches for the extraction loop: decode in DataLoader workers, group images by size, device defaults.

Image sizes are read from the file headers first; images are grouped by their size after the
``imsize`` shrink, so a batch of ``batch_size`` needs no padding. Unreadable images are reported
(index, reason) and never stop the run unless ``strict``.

GPU decode (``decode="cuda"``): workers only read the file bytes; JPEGs are decoded on the GPU with
``torchvision.io.decode_jpeg(..., device="cuda", apply_exif_orientation=True)``, cropped, resized
(bicubic, antialiased) and normalised there. Other formats, and JPEGs nvjpeg refuses, go through
PIL as usual. Resizing on the GPU is not bit-identical to PIL's (descriptors agree to ~1e-2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F

from .images import Box, ImageError, clip_box, image_size, image_tensor, load_image, reason_of, resized_size

__all__ = ["iter_batches", "batch_defaults", "prepare_model", "buckets", "prefetched", "DECODES"]

DECODES = ("cpu", "cuda")
T = TypeVar("T")


class _Images(torch.utils.data.Dataset):
    """Item i -> (i, (3,H,W) tensor or None, reason or None); ``raw``: JPEG bytes instead of a tensor."""

    def __init__(self, paths: Sequence[Path], bboxes: Sequence[Box | None], imsize: int | None, mean, std,
                 raw: bool = False):
        self.paths, self.bboxes, self.imsize, self.mean, self.std, self.raw = paths, bboxes, imsize, mean, std, raw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            if self.raw:
                src = self.paths[i]
                data = bytes(src) if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
                if data[:3] == b"\xff\xd8\xff":  # JPEG: decoded on the GPU
                    return i, ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)), None
            return i, image_tensor(load_image(self.paths[i], self.bboxes[i]), self.imsize, self.mean, self.std), None
        except ImageError as exc:
            return i, None, exc.reason
        except Exception as exc:  # pragma: no cover - unexpected decoder failure
            return i, None, reason_of(exc)


def _collate(items):
    """In the worker: stack same-size images -> ([(indices, (B,3,H,W))], [(index, reason)], [(index, bytes)])."""
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    bad, raw = [], []
    for i, x, reason in items:
        if x is None:
            bad.append((i, reason))
        elif isinstance(x, tuple):
            raw.append((i, x[1]))
        else:  # same size as the header said unless the file lied; group to be safe
            groups.setdefault(tuple(x.shape[-2:]), []).append((i, x))
    stacked = [([i for i, _ in g], torch.stack([x for _, x in g])) for g in groups.values()]
    return stacked, bad, raw


def buckets(sizes: dict[int, tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Index batches, each of images with the same (resized) size, at most ``batch_size`` long."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in sizes.items():
        groups.setdefault(size, []).append(i)
    batches = [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]
    batches.sort(key=lambda b: b[0])
    return batches


def batch_defaults(dev: torch.device, batch_size: int | None, workers: int | None) -> tuple[int, int]:
    """(batch_size, workers): 16 and up to 8 decoding workers on CUDA; batch 1 and 0-4 workers on the CPU."""
    cpus = os.cpu_count() or 1
    if batch_size is None:
        batch_size = 16 if dev.type == "cuda" else 1
    if workers is None:
        workers = min(8, cpus) if dev.type == "cuda" else (0 if cpus <= 2 else min(4, cpus // 2))
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
    return batch_size, workers


def prepare_model(model: torch.nn.Module, dev: torch.device, channels_last: bool) -> torch.nn.Module:
    """``model`` in eval mode on ``dev`` (channels_last memory format when asked)."""
    model.eval().to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _gpu_decode(raw: list[tuple[int, torch.Tensor]], paths: Sequence[Path], bboxes: Sequence[Box | None],
                sizes: dict[int, tuple[int, int]], mean, std, dev: torch.device
                ) -> tuple[list[tuple[list[int], torch.Tensor]], list[tuple[int, torch.Tensor]]]:
    """JPEG bytes -> ([(indices, (B,3,H,W) on dev)], [(i, (3,H,W) CPU fallback)]); PIL for what nvjpeg refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        images = decode_jpeg([b for _, b in raw], mode=ImageReadMode.RGB, device=dev, apply_exif_orientation=True)
    except RuntimeError:  # one bad file fails the batch: decode one by one
        images = []
        for _, b in raw:
            try:
                images.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=dev, apply_exif_orientation=True))
            except RuntimeError:
                images.append(None)
    m = torch.tensor(mean, dtype=torch.float32, device=dev).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=dev).view(3, 1, 1)
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    fallback = []
    for (i, _), im in zip(raw, images):
        if im is None:
            fallback.append(i)
            continue
        if bboxes[i] is not None:
            x1, y1, x2, y2 = clip_box(paths[i], bboxes[i], im.shape[-1], im.shape[-2])
            im = im[:, y1:y2, x1:x2]
        x = im.float().div_(255.0)
        w, h = sizes[i]
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp_(0.0, 1.0)  # PIL clips bicubic overshoot to [0, 255] too
        groups.setdefault((h, w), []).append((i, (x - m) / s))
    stacked = [([i for i, _ in g], torch.stack([x for _, x in g])) for g in groups.values()]
    return stacked, fallback


def iter_batches(
    *,
    paths: Sequence[Path],
    bboxes: Sequence[Box | None],
    imsize: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    workers: int,
    failed: list[tuple[int, str]],
    strict: bool = False,
    pin: bool = False,
    decode: str = "cpu",
    device: torch.device | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices, (B,3,H,W) tensor) batches of same-size images; unreadable ones go to ``failed``.

    ``decode="cuda"``: JPEGs decoded on ``device`` (a CUDA device); their batches are already there.
    ``strict``: raise ImageError at the first unreadable image instead.
    """
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if decode == "cuda" and (device is None or device.type != "cuda"):
        raise ValueError("GPU decoding (decode='cuda') needs a CUDA device")

    def bad(i: int, reason: str) -> None:
        if strict:
            raise ImageError(paths[i], reason)
        failed.append((i, reason))

    sizes: dict[int, tuple[int, int]] = {}
    for i, (path, box) in enumerate(zip(paths, bboxes)):
        try:
            sizes[i] = resized_size(*image_size(path, box), imsize)
        except ImageError as exc:
            bad(i, exc.reason)
    data = _Images(paths, bboxes, imsize, mean, std, raw=decode == "cuda")
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=buckets(sizes, batch_size), num_workers=workers, collate_fn=_collate,
        pin_memory=pin, persistent_workers=False,
    )
    for stacked, bad_items, raw in loader:
        for i, reason in bad_items:
            bad(i, reason)
        yield from stacked
        if raw:
            on_gpu, fallback = _gpu_decode(raw, paths, bboxes, sizes, mean, std, device)
            yield from on_gpu
            for i in fallback:
                try:
                    yield [i], image_tensor(load_image(paths[i], bboxes[i]), imsize, mean, std)[None]
                except ImageError as exc:
                    bad(i, exc.reason)


def prefetched(batches: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``batches`` produced by a background thread, up to ``depth`` ahead of the consumer: decoding and
    resizing the next image overlaps with describing this one (PIL and torch release the GIL). Items,
    their order and any exception raised while producing them reach the consumer unchanged; closing
    the generator early stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, end))
        except BaseException as exc:  # handed to the consumer, raised there
            q.put((False, exc))

    thread = threading.Thread(target=produce, name="cbir-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
