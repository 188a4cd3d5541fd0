"""GPU extraction end to end from JPEG files: GPU decode + batched bf16 vs the cirtorch-style loop.

Three ways to describe the same JPEG files with the same model on the same card, timed from file
names to L2-normalised descriptors on the host (ResNet-101 + GeM, multi-scale, longest side --imsize):

1. baseline, cirtorch-style (as cirtorch's ``extract_vectors``): PIL decode + bicubic resize on the
   CPU, one image at a time, fp32 (torch's defaults), contiguous NCHW, one forward per scale,
   scales combined by the generalized mean, L2.
2. ``cbir.extract.extract`` with the library's defaults for CUDA (size-bucketed batches, bf16
   autocast, channels_last; its decoding as the library does it at this version).
3. GPU decode: file bytes read on the CPU, ``torchvision.io.decode_jpeg(..., device="cuda")``
   (nvJPEG, a list of images per call), resize (bicubic, antialias) and normalisation on the GPU,
   images of equal size batched, bf16 autocast + channels_last, per-scale bilinear downsampling
   on the GPU, the same GeM combination.

Ratios are (images/s of 2 or 3) / (images/s of 1). Descriptors of 2 and 3 are compared with the
baseline's (cosine; nvJPEG and libjpeg-turbo decode slightly differently, bf16 vs fp32). The GPU
decode path does not apply EXIF orientation (the rParis photos have none).

    python benchmarks/gpu_extract.py --folder jpg/ --images 40 --model resnet101 --weights none
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from cbir.extract import combine_scales, extract, resized_size  # noqa: E402
from cbir.model import build_model  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from extract import baseline  # noqa: E402  (the cirtorch-style loop, shared with benchmarks/extract.py)


def gpu_decode(model, paths, imsize, scales, dev, batch: int) -> np.ndarray:
    """Path 3: nvJPEG decode, GPU resize, size-bucketed bf16 batches."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    p = model.multiscale_p()
    mean = torch.tensor(model.mean, device=dev).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(model.std, device=dev).view(1, 3, 1, 1) * 255.0
    data = [read_file(str(x)) for x in paths]
    out = [None] * len(paths)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        # decode in groups (a list per call), resize each to its target size, bucket equal sizes
        buckets: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for g in range(0, len(data), batch):
            imgs = decode_jpeg(data[g:g + batch], mode=ImageReadMode.RGB, device=dev)
            for j, im in enumerate(imgs):
                h, w = im.shape[1:]
                tw, th = resized_size(w, h, imsize)
                x = im[None].float()
                if (tw, th) != (w, h):
                    x = F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False, antialias=True)
                    x = x.clamp_(0, 255).round_()  # PIL's resize output is uint8
                buckets.setdefault((th, tw), []).append((g + j, x))
        for items in buckets.values():
            for b in range(0, len(items), batch):
                part = items[b:b + batch]
                x = (torch.cat([t for _, t in part]) - mean) / std
                vs = []
                for s in scales:
                    xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                                        antialias=True)
                    vs.append(model.pool(xs.contiguous(memory_format=torch.channels_last)).float())
                v = combine_scales(torch.stack(vs), p) if len(vs) > 1 else vs[0]
                v = model.head(v).float().cpu().numpy()
                for (i, _), row in zip(part, v):
                    out[i] = row
    return np.stack(out)


def timed(fn, rounds: int = 1):
    best = []
    r = None
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        best.append(time.perf_counter() - t)
    return float(np.median(best)), r


def cos(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    c = (a * b).sum(1)
    return float(c.mean()), float(c.min())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))
    ap.add_argument("--folder", default=str(shared / "data" / "rparis6k-250" / "jpg"))
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--imsize", type=int, default=1024)
    ap.add_argument("--scales", default="1,0.7071,0.5")
    ap.add_argument("--model", default="resnet101")
    ap.add_argument("--weights", default="none", help="none (random; speed does not depend on them) or default")
    ap.add_argument("--batch", type=int, default=16, help="images per decode call and per forward (GPU decode path)")
    ap.add_argument("--repeat", type=int, default=4,
                    help="the file list is repeated this many times for the fast paths (longer timings)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of the fast paths (median)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev = torch.device("cuda")
    paths = sorted(Path(args.folder).glob("*.jpg"))[: args.images]
    if not paths:
        raise SystemExit(f"no .jpg files in {args.folder}")
    scales = [float(s) for s in args.scales.split(",")]
    model = build_model(args.model, pooling="gem", weights=args.weights).to(dev).eval()
    name = torch.cuda.get_device_name(0)
    print(f"{name}: {args.model} ({args.weights} weights) GeM, {len(paths)} JPEGs, {args.imsize} px, scales {scales}",
          flush=True)

    baseline(model, paths[:2], args.imsize, scales, dev)  # warm-up (cuDNN, CUDA context)
    t_base, v_base = timed(lambda: baseline(model, paths, args.imsize, scales, dev))
    ips_base = len(paths) / t_base
    print(f"1 baseline (cirtorch-style, fp32, 1 image at a time): {ips_base:8.1f} img/s", flush=True)

    many = paths * args.repeat
    torch.backends.cudnn.benchmark = True
    kw = dict(imsize=args.imsize, scales=scales, device="cuda", progress=False, strict=True)
    extract(model, many, **kw)  # warm-up: cuDNN autotune of every shape
    t_lib, r_lib = timed(lambda: extract(model, many, **kw), args.rounds)
    ips_lib = len(many) / t_lib
    print(f"2 cbir.extract (library defaults for CUDA):           {ips_lib:8.1f} img/s = {ips_lib / ips_base:5.1f}x",
          flush=True)
    model.to(memory_format=torch.channels_last)
    gpu_decode(model, many, args.imsize, scales, dev, args.batch)  # warm-up
    t_gpu, v_gpu = timed(lambda: gpu_decode(model, many, args.imsize, scales, dev, args.batch), args.rounds)
    ips_gpu = len(many) / t_gpu
    print(f"3 GPU decode (nvJPEG) + bf16 batches:                   {ips_gpu:8.1f} img/s = {ips_gpu / ips_base:5.1f}x",
          flush=True)
    c_lib = cos(r_lib.vectors[: len(paths)], v_base)
    c_gpu = cos(v_gpu[: len(paths)], v_base)
    print(f"cosine to the baseline's descriptors: cbir.extract mean {c_lib[0]:.5f} min {c_lib[1]:.5f}; "
          f"GPU decode mean {c_gpu[0]:.5f} min {c_gpu[1]:.5f}")
    out = {"gpu": name, "model": args.model, "weights": args.weights, "images": len(paths), "repeat": args.repeat,
           "imsize": args.imsize, "scales": scales, "batch": args.batch, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "images_per_s": {"baseline": round(ips_base, 2), "cbir_extract": round(ips_lib, 2), "gpu_decode": round(ips_gpu, 2)},
           "ratio": {"cbir_extract": round(ips_lib / ips_base, 2), "gpu_decode": round(ips_gpu / ips_base, 2)},
           "cosine_to_baseline": {"cbir_extract": c_lib, "gpu_decode": c_gpu}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
