"""Descriptors per second: cbir.extract vs a cirtorch-style baseline, measured in the same run.

Baseline (the way cirtorch's ``extract_vectors`` / revisitop examples work): one image at a time,
fp32, contiguous (NCHW) tensors, one forward pass per scale, pooled vectors combined by the same
generalized mean. cbir: ``cbir.extract.extract`` with its defaults for the device (CPU: batch 1 +
channels_last; CUDA: size-bucketed batches of 16, bf16 autocast, channels_last, decoding workers).
Same model, same images, same scales; the two are run alternately (``--rounds``, default 3) so that
load from other processes hits both alike, and the median of the per-round ratios is reported.
On CUDA cbir decodes the JPEGs on the GPU (nvjpeg, ``--decode auto``); the baseline decodes with PIL. The
descriptors of the two are also compared (cosine similarity).

  python benchmarks/extract.py                                   # CPU, Lite0, 16 photos, 1024 px, 3 scales
  python benchmarks/extract.py --images 24 --rounds 2
  python benchmarks/extract.py --sweep                           # CPU: batch size / channels_last / workers
  python benchmarks/extract.py --backend openvino                # the optional CPU backend
  python benchmarks/extract.py --device cuda --model resnet101 --weights none --images 256 --imsize 1024

Needs ../shared/data/rparis6k-250 (or --folder DIR of images).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cbir.extract import extract, image_tensor, is_image_file, load_image  # noqa: E402
from cbir.model import build_model  # noqa: E402


def baseline(model, paths, imsize, scales, device) -> np.ndarray:
    """cirtorch-style: for each image, for each scale, one fp32 forward; GeM-combine; L2."""
    model.to(device).to(memory_format=torch.contiguous_format).eval()
    p = model.multiscale_p()
    out = []
    with torch.no_grad():
        for path in paths:
            x = image_tensor(load_image(path), imsize, model.mean, model.std)[None].to(device)
            acc = 0.0
            for s in scales:
                xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                                    antialias=True)
                v = model.pool(xs)
                acc = acc + v.clamp(min=0).pow(p) if p != 1 else acc + v
            v = (acc / len(scales)).pow(1.0 / p) if p != 1 else acc / len(scales)
            v = model.head(F.normalize(v, dim=-1))
            out.append(v.cpu().numpy()[0])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return np.stack(out)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))
    ap.add_argument("--folder", default=str(shared / "data" / "rparis6k-250" / "jpg"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--imsize", type=int, default=1024)
    ap.add_argument("--scales", default="1,0.7071,0.5")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--pooling", default="gem")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--precision", default="auto", help="cbir precision: auto (bf16 on CUDA and on CPUs with "
                    "native bf16), fp32, bf16")
    ap.add_argument("--rounds", type=int, default=3, help="alternate baseline/cbir this many times; the median "
                    "of the per-round ratios is reported (default: 3)")
    ap.add_argument("--backend", default="torch", help="cbir inference backend: torch, openvino, onnxruntime")
    ap.add_argument("--decode", default="auto", help="cbir JPEG decoding: auto (GPU on CUDA), cpu, cuda")
    ap.add_argument("--sweep", action="store_true", help="also time other batch sizes / memory formats / workers")
    args = ap.parse_args()

    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"image folder not found: {folder} (set CBIR_SHARED or --folder)", file=sys.stderr)
        return 2
    files = sorted(f for f in folder.iterdir() if is_image_file(f))
    step = max(1, len(files) // args.images)
    paths = files[::step][: args.images]  # spread over all landmarks
    scales = tuple(float(s) for s in args.scales.split(","))
    model = build_model(args.model, pooling=args.pooling, weights=args.weights)
    dev = args.device
    print(f"device={dev} torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} model={args.model} "
          f"pooling={args.pooling} images={len(paths)} imsize={args.imsize} scales={scales}")
    if dev.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name(0)}")

    def run_cbir(**kw):
        opts = dict(imsize=args.imsize, scales=scales, device=dev, progress=False, batch_size=args.batch_size,
                    workers=args.workers, precision=args.precision, backend=args.backend, decode=args.decode)
        opts.update(kw)
        return extract(model, paths, **opts).vectors

    # warm-up (allocator, kernels, cudnn autotune, backend compilation) on two images for both
    baseline(model, paths[:2], args.imsize, scales, dev)
    run_cbir()
    from cbir.device import resolve_device, resolve_precision

    amp = resolve_precision(resolve_device(dev), args.precision)
    if args.backend == "onnxruntime":
        amp = "fp32"  # the ONNX Runtime backend computes in fp32 whatever the precision
    also_fp32 = amp == "bf16" and args.backend == "torch"  # then also time cbir in fp32, to show what bf16 adds
    ratios, ratios32, t_base, t_cbir = [], [], 0.0, 0.0
    for r in range(args.rounds):
        tb, vb = timed(lambda: baseline(model, paths, args.imsize, scales, dev))
        tc, vc = timed(run_cbir)
        t_base, t_cbir = t_base + tb, t_cbir + tc
        ratios.append(tb / tc)
        line = f"round {r + 1}: baseline {len(paths) / tb:.2f} img/s, cbir {len(paths) / tc:.2f} img/s ({tb / tc:.2f}x)"
        if also_fp32:
            tf, vf = timed(lambda: run_cbir(precision="fp32", backend="torch"))
            ratios32.append(tb / tf)
            line += f", cbir fp32 {len(paths) / tf:.2f} img/s ({tb / tf:.2f}x)"
        print(line, flush=True)
    n = len(paths) * args.rounds
    cos = (vb * vc).sum(axis=1)
    print(f"baseline (1 image, fp32, NCHW, 1 pass per scale): {n / t_base:.2f} descriptors/s")
    print(f"cbir extract (defaults for {dev}, {amp}, backend {args.backend}, decode {args.decode}): "
          f"{n / t_cbir:.2f} descriptors/s")
    print(f"speed-up: median {np.median(ratios):.2f}x over {len(ratios)} rounds "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}); descriptor agreement: min cosine {cos.min():.4f}")
    if also_fp32:
        cos32 = (vb * vf).sum(axis=1)
        print(f"cbir extract in fp32: median {np.median(ratios32):.2f}x the baseline (min cosine {cos32.min():.4f})")

    if args.sweep:
        print("sweep (each against a fresh baseline run right before it):")
        configs = [dict(batch_size=1, channels_last=False), dict(batch_size=1, channels_last=True),
                   dict(batch_size=4, channels_last=True), dict(batch_size=1, channels_last=True, workers=1)]
        for cfg in configs:
            tb, _ = timed(lambda: baseline(model, paths, args.imsize, scales, dev))
            tc, _ = timed(lambda: run_cbir(**cfg))
            print(f"  {cfg}: {len(paths) / tc:.2f} img/s, {tb / tc:.2f}x the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
