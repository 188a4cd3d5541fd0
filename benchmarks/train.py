"""Training throughput (images/s through forward + backward + optimiser step) of one tuple batch.

Compares, in the same run on the same inputs, a cirtorch-style baseline — every image of a tuple
forwarded on its own (batch of 1, as cirtorch does because its tuple images differ in size) and
the descriptors stacked for one loss — with cbir's trainer step: the whole batch of tuples
(square images) in one forward, BN frozen, contrastive loss, AdamW; on the CPU also with
``channels_last``; on CUDA with bf16 autocast + ``channels_last`` (the trainer's GPU path).
Reports images/s and the ratio to the baseline. Inputs are random tensors, so decoding is not
timed (see benchmarks/extract.py for that).

Usage:  .venv/bin/python benchmarks/train.py [--device cpu|cuda] [--imsize 128] [--tuples 2]
        [--negatives 2] [--steps 2] [--json out.json]   (defaults: a CPU run of a few minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="default", help="\"none\" for random weights (speed does not depend on them)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--imsize", type=int, default=128)
    ap.add_argument("--tuples", type=int, default=2, help="tuples per step")
    ap.add_argument("--negatives", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from cbir.model import build_model
    from cbir.training.losses import contrastive_loss
    from cbir.training.trainer import freeze_batchnorm, param_groups

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    t = 2 + args.negatives
    torch.manual_seed(0)
    x = torch.randn(args.tuples, t, 3, args.imsize, args.imsize)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run(mode: str) -> float:
        torch.manual_seed(0)
        model = build_model(args.model, pooling="gem", weights=args.weights).to(dev)
        cl = mode in ("batched+channels_last", "batched+bf16+channels_last")
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(param_groups(model, 1e-6, 1e-4))
        model.train()
        freeze_batchnorm(model)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if "bf16" in mode else nullcontext()
        xb = x.to(dev)

        def step() -> float:
            if mode == "per-image (cirtorch-style)":
                embs = []
                for i in range(args.tuples):
                    embs.append(torch.cat([model(xb[i, j : j + 1]) for j in range(t)]))
                e = torch.stack(embs)
            else:
                inp = xb.flatten(0, 1)
                if cl:
                    inp = inp.contiguous(memory_format=torch.channels_last)
                with amp:
                    e = model(inp).float().view(args.tuples, t, -1)
            loss = contrastive_loss(e[:, 0], e[:, 1], e[:, 2:], 0.75)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        first_loss[mode] = step()  # same weights, same inputs: every mode must give the same loss
        for _ in range(args.warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return args.tuples * t * args.steps / (time.perf_counter() - t0)

    modes = ["per-image (cirtorch-style)", "batched"]
    modes += ["batched+channels_last"] if dev.type == "cpu" else ["batched+bf16+channels_last"]
    first_loss: dict[str, float] = {}
    res = {m: run(m) for m in modes}
    # correctness: BN frozen, so a batched step computes what the per-image one does (bf16: ~1e-2)
    ref = first_loss[modes[0]]
    for m, v in first_loss.items():
        tol = 3e-2 if "bf16" in m else 1e-4
        if abs(v - ref) > tol * max(1.0, abs(ref)):
            print(f"{m}: first-step loss {v:.6f} differs from the per-image baseline {ref:.6f}", file=sys.stderr)
            return 1
    base = res[modes[0]]
    out = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "model": args.model, "weights": args.weights, "imsize": args.imsize, "tuples_per_step": args.tuples, "images_per_tuple": t,
        "steps": args.steps,
        "images_per_s": {m: round(v, 2) for m, v in res.items()},
        "first_step_loss": {m: round(v, 6) for m, v in first_loss.items()},
        "ratio_to_baseline": {m: round(v / base, 2) for m, v in res.items()},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
