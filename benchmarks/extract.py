"""Descriptors per second: cbir.extract vs a cirtorch-style baseline, measured in the same run.

Baseline (the way cirtorch's ``extract_vectors`` / revisitop examples work): one image at a time,
fp32, contiguous (NCHW) tensors, one forward pass per scale, pooled vectors combined by the same
generalized mean. cbir: ``cbir.extract.extract`` with its defaults for the device (CPU: the "auto"
backend = ONNX Runtime fp32 where installed, batch 1, the next image decoded in a thread; CUDA:
size-bucketed batches of 16, bf16 autocast, channels_last, decoding workers, nvjpeg), or the
variants named by ``--backends``. Same model, same images, same scales; the baseline and every
variant run alternately in each round (``--rounds``, default 3) so that load from other processes
hits them alike, and the median of the per-round ratios (baseline time / variant time) is reported
with the machine's load average. The descriptors of each variant are compared with the baseline's
(fp32 torch): min cosine over the images.

A variant is ``BACKEND[:PRECISION][:noprefetch]``: BACKEND auto, torch, onnxruntime, openvino;
PRECISION auto, fp32, bf16 (default auto); ``noprefetch`` turns the decoding thread off.

  python benchmarks/extract.py                                   # CPU, Lite0, 16 photos, 1024 px, 3 scales, default path
  python benchmarks/extract.py --images 8 --rounds 5 --backends auto,torch,torch:fp32,openvino,openvino:fp32
  python benchmarks/extract.py --backends auto,auto:noprefetch   # what the decoding thread adds
  python benchmarks/extract.py --sweep                           # CPU: batch size / channels_last / workers (torch)
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


def parse_variant(text: str) -> dict:
    """"BACKEND[:PRECISION][:noprefetch]" -> extract() keyword arguments."""
    parts = text.split(":")
    kw = {"backend": parts[0], "precision": "auto", "prefetch": True}
    for part in parts[1:]:
        if part == "noprefetch":
            kw["prefetch"] = False
        elif part in ("auto", "fp32", "bf16"):
            kw["precision"] = part
        else:
            raise SystemExit(f"bad variant {text!r}: BACKEND[:PRECISION][:noprefetch]")
    return kw


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


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
    ap.add_argument("--rounds", type=int, default=3, help="alternate the baseline and the variants this many times; "
                    "the median of the per-round ratios is reported (default: 3)")
    ap.add_argument("--backends", "--backend", default="auto",
                    help="comma-separated variants BACKEND[:PRECISION][:noprefetch] (default: auto, the default path)")
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
    variants = [(v, parse_variant(v)) for v in args.backends.split(",") if v]
    print(f"device={dev} torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} model={args.model} "
          f"pooling={args.pooling} images={len(paths)} imsize={args.imsize} scales={scales} "
          f"load average (1/5/15 min) {load_average()}")
    if dev.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name(0)}")

    def run_cbir(**kw):
        opts = dict(imsize=args.imsize, scales=scales, device=dev, progress=False, batch_size=args.batch_size,
                    workers=args.workers, decode=args.decode)
        opts.update(kw)
        return extract(model, paths, **opts)

    # warm-up (allocator, kernels, cudnn autotune, backend conversion) on two images for each
    baseline(model, paths[:2], args.imsize, scales, dev)
    used = {}
    for name, kw in variants:
        res = extract(model, paths[:2], imsize=args.imsize, scales=scales, device=dev, progress=False,
                      batch_size=args.batch_size, workers=args.workers, decode=args.decode, **kw)
        used[name] = f"{res.backend} {res.precision}"
    ratios = {name: [] for name, _ in variants}
    times = {name: 0.0 for name, _ in variants}
    vecs, t_base = {}, 0.0
    for r in range(args.rounds):
        tb, vb = timed(lambda: baseline(model, paths, args.imsize, scales, dev))
        t_base += tb
        line = [f"round {r + 1} (load {load_average()}): baseline {len(paths) / tb:.2f} img/s"]
        for name, kw in variants:
            tc, res = timed(lambda: run_cbir(**kw))
            times[name] += tc
            vecs[name] = res.vectors
            ratios[name].append(tb / tc)
            line.append(f"{name} {len(paths) / tc:.2f} img/s ({tb / tc:.2f}x)")
        print(", ".join(line), flush=True)
    n = len(paths) * args.rounds
    print(f"baseline (1 image, fp32, NCHW, 1 pass per scale): {n / t_base:.2f} descriptors/s")
    print("| variant | runs as | per-round ratios | median | min cosine to the fp32 baseline |")
    print("|---|---|---|---|---|")
    for name, _ in variants:
        rs = ratios[name]
        cos = (vb * vecs[name]).sum(axis=1)
        print(f"| {name} | {used[name]} | {', '.join(f'{x:.2f}' for x in rs)} | **{np.median(rs):.2f}x** "
              f"({n / times[name]:.2f} img/s) | {cos.min():.5f} |")
    print(f"load average after: {load_average()}")

    if args.sweep:
        print("sweep, torch backend (each against a fresh baseline run right before it):")
        configs = [dict(batch_size=1, channels_last=False), dict(batch_size=1, channels_last=True),
                   dict(batch_size=4, channels_last=True), dict(batch_size=1, channels_last=True, workers=1)]
        for cfg in configs:
            tb, _ = timed(lambda: baseline(model, paths, args.imsize, scales, dev))
            tc, _ = timed(lambda: run_cbir(backend="torch", **cfg))
            print(f"  {cfg}: {len(paths) / tc:.2f} img/s, {tb / tc:.2f}x the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
