"""Image loading and batched, multi-scale descriptor extraction.

Pipeline per image: decode (PIL, EXIF orientation applied, RGB, optional crop box x1,y1,x2,y2 in
displayed pixels) -> shrink so the longest side is at most ``imsize`` (never enlarged, as in the
revisitop/cirtorch protocol) -> ImageNet normalisation -> for each scale s, bilinear resize by s
-> ``net.pool`` (backbone + pooling + L2) -> scales combined by a generalized mean
v = (1/S Σ_s v_s^p)^(1/p) (p = GeM's p, else 1) -> L2 -> ``net.head`` (whitening + L2, if any).

Speed: image sizes are read from the file headers first, images are grouped by their size after
resizing so a batch needs no padding, and DataLoader workers decode in parallel. On CUDA: bf16
autocast, channels_last, batches of 16. On the CPU: channels_last, batch 1, and bf16 autocast when
the CPU computes bf16 natively (AMX / AVX512-BF16); see benchmarks/extract.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .descriptors import Descriptors
from .fileio import FormatError, atomic_open, atomic_write_json, read_json

__all__ = [
    "ImageError", "ExtractResult", "load_image", "image_size", "resized_size", "image_tensor",
    "combine_scales", "extract", "extract_to_dir", "fit_bow", "save_codebook", "load_codebook",
    "DEFAULT_SCALES",
]

DEFAULT_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
Box = tuple[float, float, float, float]


class ImageError(ValueError):
    """An image could not be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str] | bytes, reason: str):
        path = _label(path)
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class ExtractResult:
    """``vectors[i]`` describes input ``ok[i]``; ``failed`` lists the inputs that could not be read."""

    vectors: np.ndarray
    ok: np.ndarray
    failed: list[dict[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Images


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if "cannot identify image file" in text:
        return "not an image (unknown or corrupt format)"
    if "truncated" in text.lower() or isinstance(exc, (EOFError,)):
        return f"truncated or damaged image ({text})"
    return text


def _check_box(path: Path, bbox: Box, w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbox)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if x2 <= x1 or y2 <= y1:
        raise ImageError(path, f"crop box {tuple(bbox)} is empty inside the {w}x{h} image")
    return x1, y1, x2, y2


def _label(path: Any) -> str:
    """How an image is named in messages: its path, or "<image in memory>" for bytes."""
    return "<image in memory>" if isinstance(path, (bytes, bytearray)) else str(path)


def _readable_file(path: str | os.PathLike[str] | bytes) -> Path | io.BytesIO:
    """``path`` as a Path (image bytes: a BytesIO over them); ImageError naming it when it is missing or empty."""
    if isinstance(path, (bytes, bytearray)):
        if not path:
            raise ImageError(path, "empty file")
        return io.BytesIO(path)
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file")
    return path


def load_image(path: str | os.PathLike[str] | bytes, bbox: Box | None = None) -> Image.Image:
    """Decode ``path`` (a file, or the image's bytes) fully as RGB, EXIF orientation applied, cropped to ``bbox``.

    Raises ImageError (naming the file) for a missing, empty, truncated or non-image file.
    """
    src = _readable_file(path)
    try:
        with Image.open(src) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # PIL raises many kinds
        raise ImageError(path, _reason(exc)) from exc
    if bbox is not None:
        im = im.crop(_check_box(path, bbox, *im.size))
    return im


def image_size(path: str | os.PathLike[str] | bytes, bbox: Box | None = None) -> tuple[int, int]:
    """(width, height) the decoded image will have, from the header only (EXIF rotation and crop included)."""
    src = _readable_file(path)
    try:
        with Image.open(src) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:
        raise ImageError(path, _reason(exc)) from exc
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if bbox is not None:
        x1, y1, x2, y2 = _check_box(path, bbox, w, h)
        w, h = x2 - x1, y2 - y1
    return w, h


def resized_size(w: int, h: int, imsize: int | None) -> tuple[int, int]:
    """Size after shrinking so that max(w', h') <= imsize, keeping the aspect ratio (never enlarged)."""
    if imsize is None or max(w, h) <= imsize:
        return w, h
    s = imsize / max(w, h)
    return max(1, int(round(w * s))), max(1, int(round(h * s)))


def image_tensor(im: Image.Image, imsize: int | None, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32, resized (``resized_size``) and normalised (x - mean) / std."""
    size = resized_size(*im.size, imsize)
    if size != im.size:
        im = im.resize(size, Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def combine_scales(v: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """Generalized mean over scales then L2: (S, B, D) -> (B, D), (1/S Σ_s v_s^p)^(1/p) / ||·||₂.

    p ≠ 1 needs non-negative inputs (GeM outputs are); they are clamped at 0 in that case.
    """
    if p == 1.0:
        out = v.mean(dim=0)
    else:
        out = v.clamp(min=0).pow(p).mean(dim=0).pow(1.0 / p)
    return F.normalize(out, dim=-1)


# --------------------------------------------------------------------------------------------
# Loading in parallel, batched by size


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], bboxes: Sequence[Box | None], imsize: int | None, mean, std):
        self.paths, self.bboxes, self.imsize, self.mean, self.std = paths, bboxes, imsize, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, image_tensor(load_image(self.paths[i], self.bboxes[i]), self.imsize, self.mean, self.std), None
        except ImageError as exc:
            return i, None, exc.reason
        except Exception as exc:  # pragma: no cover - unexpected decoder failure
            return i, None, _reason(exc)


def _collate(items):
    """In the worker: stack same-size images -> ([(indices, (B,3,H,W))], [(index, reason)], n)."""
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    bad = []
    for i, x, reason in items:
        if x is None:
            bad.append((i, reason))
        else:  # same size as the header said unless the file lied; group to be safe
            groups.setdefault(tuple(x.shape[-2:]), []).append((i, x))
    stacked = [([i for i, _ in g], torch.stack([x for _, x in g])) for g in groups.values()]
    return stacked, bad, len(items)


def _buckets(sizes: dict[int, tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Index batches, each of images with the same (resized) size, at most ``batch_size`` long."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in sizes.items():
        groups.setdefault(size, []).append(i)
    batches = [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]
    batches.sort(key=lambda b: b[0])
    return batches


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available (use --device cpu)")
    return dev


def _defaults(dev: torch.device, batch_size: int | None, workers: int | None) -> tuple[int, int]:
    cpus = os.cpu_count() or 1
    if batch_size is None:
        batch_size = 16 if dev.type == "cuda" else 1
    if workers is None:
        workers = min(8, cpus) if dev.type == "cuda" else (0 if cpus <= 2 else min(4, cpus // 2))
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
    return batch_size, workers


def _iter_batches(paths, bboxes, imsize, mean, std, batch_size, workers, failed, strict, pin):
    """Yield (indices, (B,3,H,W) tensor) batches; unreadable images are appended to ``failed``."""
    sizes: dict[int, tuple[int, int]] = {}
    for i, (path, box) in enumerate(zip(paths, bboxes)):
        try:
            sizes[i] = resized_size(*image_size(path, box), imsize)
        except ImageError as exc:
            if strict:
                raise
            failed.append((i, exc.reason))
    batches = _buckets(sizes, batch_size)
    data = _Images(paths, bboxes, imsize, mean, std)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=batches, num_workers=workers, collate_fn=_collate, pin_memory=pin,
        persistent_workers=False,
    )
    for stacked, bad, n_items in loader:
        for i, reason in bad:
            if strict:
                raise ImageError(paths[i], reason)
            failed.append((i, reason))
        for idx, x in stacked:
            yield idx, x, n_items


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (Intel AMX or AVX512-BF16; read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def _precision(dev: torch.device, precision: str) -> str:
    """"auto": bf16 on CUDA and on CPUs with native bf16, else fp32. On this project's AMX CPU bf16 was
    1.12x faster than fp32 in benchmarks/extract.py, descriptors at cosine >= 0.998 to fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        return "bf16" if dev.type == "cuda" or cpu_has_native_bf16() else "fp32"
    return precision


def _autocast(dev: torch.device, precision: str):
    return torch.autocast(dev.type if dev.type in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def _prepare(model: torch.nn.Module, dev: torch.device, channels_last: bool) -> torch.nn.Module:
    model.eval().to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def extract(
    model,
    images: Sequence[str | os.PathLike[str]],
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
    on_progress: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Descriptors of ``images`` with RetrievalNet ``model`` (moved to ``device``, eval mode).

    Returns ExtractResult(vectors (N_ok, D) float32 L2-normalised, ok (N_ok,) input indices,
    failed [{"path", "reason"}]). ``strict=True`` raises ImageError at the first unreadable image.
    ``precision``: "auto" (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), "fp32", "bf16".
    ``on_progress(n)`` is called with the number of images just described. The model is left on
    ``device`` (in channels_last when that is on) and in the train/eval mode it came in.
    """
    paths = [p if isinstance(p, (bytes, bytearray)) else Path(p) for p in images]  # bytes: an image in memory
    if bboxes is None:
        bboxes = [None] * len(paths)
    if len(bboxes) != len(paths):
        raise ValueError(f"{len(bboxes)} crop boxes for {len(paths)} images")
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {scales}")
    if getattr(model.pooling, "name", "") == "bow" and not bool(model.pooling.fitted):
        raise ValueError("BoW pooling needs a codebook: fit_bow(model, images) first or pass --codebook FILE")
    dev = _device(device)
    batch_size, workers = _defaults(dev, batch_size, workers)
    was_training = model.training
    amp = _precision(dev, precision)
    _prepare(model, dev, channels_last)
    p = model.multiscale_p()
    failed_idx: list[tuple[int, str]] = []
    out: dict[int, np.ndarray] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), unit="img", desc="extract", dynamic_ncols=True)
    try:
        with torch.inference_mode(), _autocast(dev, amp):
            for idx, x, n_read in _iter_batches(paths, bboxes, imsize, model.mean, model.std, batch_size,
                                                 workers, failed_idx, strict, dev.type == "cuda"):
                x = x.to(dev, non_blocking=True)
                per_scale = []
                for s in scales:
                    xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                                            antialias=True)
                    if channels_last:
                        xs = xs.contiguous(memory_format=torch.channels_last)
                    per_scale.append(model.pool(xs).float())
                v = per_scale[0] if len(scales) == 1 else combine_scales(torch.stack(per_scale), p)
                v = model.head(v).float().cpu().numpy()
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
    failed = [{"path": _label(paths[i]), "reason": r} for i, r in sorted(failed_idx)]
    return ExtractResult(vectors=vectors, ok=ok, failed=failed)


# --------------------------------------------------------------------------------------------
# Bag of words: codebook fitting and files

CODEBOOK_FORMAT, CODEBOOK_VERSION = "cbir-bow-codebook", 1


def fit_bow(
    model,
    images: Sequence[str | os.PathLike[str]],
    *,
    imsize: int | None = 1024,
    sample: int = 200,
    per_image: int = 300,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Fit ``model``'s BoW codebook (k-means, faiss) on local features of up to ``sample`` images
    (``per_image`` random positions each, scale 1), then idf from the hard histograms of those images.
    Sets it on ``model.pooling`` and returns {"codebook", "idf", "images"}."""
    from .pooling import bow_hard, bow_idf, fit_codebook, local_features

    pool = model.pooling
    rng = np.random.default_rng(seed)
    paths = [Path(p) for p in images]
    pick = sorted(rng.choice(len(paths), size=min(sample, len(paths)), replace=False).tolist())
    dev = _device(device)
    _prepare(model, dev, False)
    feats, maps, failed = [], [], []
    with torch.inference_mode():
        for idx, x, _ in _iter_batches([paths[i] for i in pick], [None] * len(pick), imsize, model.mean, model.std,
                                       1, 0, failed, False, False):
            fmap = model.features(x.to(dev)).float()
            loc = local_features(fmap)[0].cpu().numpy()
            take = rng.choice(loc.shape[0], size=min(per_image, loc.shape[0]), replace=False)
            feats.append(loc[take])
            maps.append(fmap.cpu())
    if not feats:
        raise ValueError("no readable image to fit the BoW codebook on")
    codebook = fit_codebook(np.concatenate(feats), pool.k, seed=seed)
    cb = torch.from_numpy(codebook)
    hist = np.stack([bow_hard(m, cb)[0].numpy() for m in maps])
    idf = bow_idf(hist)
    pool.set_codebook(codebook, idf)
    pool.to(dev)
    return {"codebook": codebook, "idf": idf, "images": len(feats)}


def save_codebook(path: str | os.PathLike[str], codebook: np.ndarray, idf: np.ndarray, about: dict | None = None) -> None:
    """Atomic .npz with the codebook (K,C), idf (K,) and a format stamp."""
    stamp = json.dumps({"format": CODEBOOK_FORMAT, "format_version": CODEBOOK_VERSION, **(about or {})})
    with atomic_open(path, "wb") as fh:
        np.savez(fh, codebook=np.asarray(codebook, np.float32), idf=np.asarray(idf, np.float32),
                 meta=np.array(stamp))


def load_codebook(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codebook file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            codebook, idf = z["codebook"], z["idf"]
    except Exception as exc:
        raise FormatError(f"{path} is not a cbir BoW codebook ({exc})") from exc
    if meta.get("format") != CODEBOOK_FORMAT or meta.get("format_version") != CODEBOOK_VERSION:
        raise FormatError(f"{path} is not a cbir BoW codebook (format {meta.get('format')!r})")
    return codebook, idf, meta


# --------------------------------------------------------------------------------------------
# To a folder, resumably

PARTIAL = ".cbir-partial"


def _fingerprint(model, ids, paths, bboxes, imsize, scales) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([model.describe(), ids, [str(p) for p in paths], [list(b) if b else None for b in bboxes],
                         imsize, list(scales)], sort_keys=True, default=str).encode())
    with torch.no_grad():
        for _, t in sorted(model.state_dict().items()):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes()[:: max(1, t.numel() // 64)])
    return h.hexdigest()[:24]


def extract_to_dir(
    model,
    images: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    ids: Sequence[str] | None = None,
    bboxes: Sequence[Box | None] | None = None,
    imsize: int | None = 1024,
    scales: Sequence[float] = DEFAULT_SCALES,
    dtype: str = "float32",
    chunk: int = 64,
    extra_meta: dict | None = None,
    **kw: Any,
) -> Descriptors:
    """Extract into ``out_dir`` (descriptors.npy + meta.json via Descriptors), resumably.

    Inputs are processed in chunks of ``chunk`` images; each finished chunk is saved atomically in
    ``out_dir/.cbir-partial``. A rerun with the same model, images and settings skips finished
    chunks (and returns at once when the folder is already complete); different settings start over.
    ``kw`` go to ``extract`` (batch_size, device, workers, progress, strict).
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    paths = [Path(p) for p in images]
    ids = [p.stem for p in paths] if ids is None else list(ids)
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} ids for {len(paths)} images")
    boxes = [None] * len(paths) if bboxes is None else list(bboxes)
    scales = tuple(float(s) for s in scales)
    out = Path(out_dir)
    amp = _precision(_device(kw.get("device", "auto")), kw.get("precision", "auto"))
    kw["precision"] = amp
    job = _fingerprint(model, ids, paths, boxes, imsize, (*scales, amp))
    if (out / "meta.json").is_file():
        try:
            done = Descriptors.load(out)
            if done.meta.get("job") == job and str(done.vectors.dtype) == dtype:
                return done
        except (FormatError, FileNotFoundError, ValueError):
            pass
    part = out / PARTIAL
    state_path = part / "job.json"
    if part.is_dir():
        try:
            if read_json(state_path, "partial job").get("job") != job:
                shutil.rmtree(part)
        except (FileNotFoundError, FormatError):
            shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, {"job": job, "n": len(paths), "chunk": chunk})
    progress = kw.pop("progress", True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), unit="img", desc="extract", dynamic_ncols=True)
    vectors, ok, failed = [], [], []
    try:
        for start in range(0, len(paths), chunk):
            stop = min(start + chunk, len(paths))
            name = part / f"chunk_{start:09d}.npz"
            if not name.is_file():
                before = bar.n if bar is not None else 0
                res = extract(model, paths[start:stop], bboxes=boxes[start:stop], imsize=imsize, scales=scales,
                              progress=False, on_progress=bar.update if bar is not None else None, **kw)
                if bar is not None:
                    bar.update(before + (stop - start) - bar.n)  # failed images count as done too
                with atomic_open(name, "wb") as fh:
                    np.savez(fh, vectors=res.vectors, ok=res.ok + start,
                             failed=np.array(json.dumps(res.failed)))
            else:
                if bar is not None:
                    bar.update(stop - start)  # done by an earlier run
            with np.load(name, allow_pickle=False) as z:
                vectors.append(z["vectors"])
                ok.append(z["ok"])
                failed.extend(json.loads(str(z["failed"])))
    finally:
        if bar is not None:
            bar.close()
    ok_idx = np.concatenate(ok) if ok else np.zeros(0, np.int64)
    mat = np.concatenate(vectors) if vectors else np.zeros((0, model.dim), np.float32)
    failed_ids = {str(Path(f["path"])): f for f in failed}
    for i, p in enumerate(paths):
        if str(p) in failed_ids:
            failed_ids[str(p)]["id"] = ids[i]
    meta = {
        **model.describe(),
        "imsize": imsize,
        "scales": list(scales),
        "multiscale_p": round(float(model.multiscale_p()), 4),
        "precision": amp,
        "job": job,
        **(extra_meta or {}),
    }
    desc = Descriptors(ids=[ids[i] for i in ok_idx], vectors=mat.astype(dtype), meta=meta, failed=failed)
    desc.save(out)
    shutil.rmtree(part, ignore_errors=True)
    return desc
