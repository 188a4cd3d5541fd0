"""Leave-one-landmark-out fine-tuning on the 250 real Paris photos (../shared/data/rparis6k-250).

For each of the five landmarks L (file-name prefix ``paris_<L>_``): fine-tune the ImageNet
EfficientNet-Lite0 + GeM on the photos of the four OTHER landmarks (class = landmark, cleaned with
the class-consistency rule, diverse hard negatives re-mined every epoch), then evaluate the revisitop
queries of L against the whole 238-image database (gnd_rparis6k_subset250.pkl, queries cropped to
their boxes), before and after fine-tuning. Prints and writes a JSON table (E/M/H mAP, percent).

CPU-sized budget, set by the flags (defaults: train at 128 px square, blocks 4-6 + head + GeM p
trainable, 2 epochs × 16 tuples of 1 query + 1 positive + 3 negatives mined from a pool of 64,
evaluation at 224 px single scale).
Usage:  .venv/bin/python benchmarks/loo_rparis.py [--out loo.json] [--epochs 3] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))
LANDMARKS = ("defense", "eiffel", "invalides", "louvre", "moulinrouge")
FROZEN_LITE0 = ["backbone.net.conv_stem", "backbone.net.bn1", "backbone.net.blocks.0", "backbone.net.blocks.1",
                "backbone.net.blocks.2", "backbone.net.blocks.3"]


def landmark(name: str) -> str:
    return name.split("_")[1]


def evaluate(bench, model, imsize: int, qsel: list[int]) -> dict:
    """E/M/H mAP of the queries ``qsel`` against the whole database, single scale, on the CPU."""
    from cbir.pipeline import describe, score, select_queries

    fold = select_queries(bench, qsel)
    q, db = describe(fold, model, imsize=imsize, scales=(1.0,), device="cpu")
    return score(fold, q, db)["mAP"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="loo_rparis.json")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--tuples", type=int, default=16, help="queries (tuples) per epoch")
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--pool", type=int, default=64, help="random pool the negatives are mined from, per epoch")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--train-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=224)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--loss", default="contrastive")
    ap.add_argument("--train-all", action="store_true", help="train every layer (default: blocks 4-6, head, GeM p)")
    ap.add_argument("--folds", default=",".join(LANDMARKS))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from cbir.model import build_model
    from cbir.pipeline import describe, load_benchmark, score, select_queries
    from cbir.training.trainer import train

    root = SHARED / "data" / "rparis6k-250"
    jpg = root / "jpg"
    if not jpg.is_dir():
        print(f"reference data not found: {root}", file=sys.stderr)
        return 2
    bench = load_benchmark(root / "gnd_rparis6k_subset250.pkl")
    allq = list(range(len(bench.query_ids)))
    t0 = time.time()
    base = build_model("efficientnet_lite0", pooling="gem")
    q0, db0 = describe(bench, base, imsize=args.eval_size, scales=(1.0,), device="cpu")
    before_s = time.time() - t0
    budget = {k: getattr(args, k) for k in ("epochs", "tuples", "negatives", "pool", "train_size", "eval_size", "lr", "loss", "train_all")}
    results = {"budget": budget, "torch_threads": torch.get_num_threads(), "folds": {}}
    for lm in args.folds.split(","):
        qsel = [i for i in allq if landmark(bench.query_ids[i]) == lm]
        before = score(select_queries(bench, qsel), q0.vectors[qsel], db0)["mAP"]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            csv = tmp / "train.csv"
            names = sorted(p.stem for p in jpg.glob("*.jpg") if landmark(p.stem) != lm)
            csv.write_text("image,label\n" + "".join(f"{n}.jpg,{landmark(n)}\n" for n in names))
            torch.manual_seed(0)
            model = build_model("efficientnet_lite0", pooling="gem")
            cfg = {
                "data": {"kind": "csv", "csv": str(csv), "root": str(jpg), "imsize": args.train_size,
                         "clean": {"k": 3.0}, "augment": True},
                "mining": {"queries_per_epoch": args.tuples, "pool_size": args.pool, "negatives": args.negatives},
                "loss": {"name": args.loss} if args.loss == "ap" else {"name": args.loss, "margin": 0.75 if args.loss == "contrastive" else 0.1},
                "optim": {"epochs": args.epochs, "batch_tuples": 4, "lr": args.lr, "schedule": "cosine",
                          "freeze": [] if args.train_all else FROZEN_LITE0},
                "out": str(tmp / "run"), "tensorboard": False, "seed": 0,
            }
            t = time.time()
            res = train(cfg, model=model, log=lambda m: print(f"[{lm}] {m}", file=sys.stderr, flush=True))
            train_s = time.time() - t
            after = evaluate(bench, res["model"], args.eval_size, qsel)
        results["folds"][lm] = {
            "queries": len(qsel), "train_images": len(names), "cleaning_dropped": res["setup"].get("cleaning_dropped"),
            "before": before, "after": after, "train_s": round(train_s, 1),
            "final_loss": res["history"][-1]["loss"],
        }
        print(json.dumps({lm: results["folds"][lm]}), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    f = results["folds"]
    results["mean"] = {w: {p: float(np.mean([f[k][w][p] for k in f])) for p in ("easy", "medium", "hard")} for w in ("before", "after")}
    results["before_extract_s"] = round(before_s, 1)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["mean"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
