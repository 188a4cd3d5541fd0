"""One cross-set fine-tuning run, end to end: train on one real set, measure on the other (issue 12.4).

``--train holidays``: fine-tune on INRIA Holidays groups (holidays-805, group = id // 100), measure
revisitop E/M/H on rparis6k-250. ``--train paris``: fine-tune on the Paris landmark labels of
rparis6k-250 (the landmark in the file name, images inconsistent with their landmark dropped by
the cleaning rule), measure Holidays mAP on holidays-805. The test photos are never seen in
training, and nothing is chosen on them: early stopping and the returned model use a validation
split of the TRAINING set (held-out Holidays groups, or held-out Paris images per landmark).

Reported, before (the ImageNet model) and after (the best validated epoch): test E/M/H without
whitening and with learned whitening (Lw, Radenović et al.) learned on the training set's
matching pairs with the same model. Descriptors of the starting model are cached in
``--cache`` (keyed by set, model and extraction settings), so only the fine-tuned model is described
again. Writes OUT/result.json (figures, settings, training history) and OUT/model.pt (best epoch).

Example (2-core CPU, minutes):
  nice python benchmarks/finetune_cross.py --train holidays --out runs/ft_hol --epochs 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("CBIR_SHARED", "../shared"))
SETS = {
    "holidays": ("holidays-805", "gnd_holidays805.pkl"),
    "paris": ("rparis6k-250", "gnd_rparis6k_subset250.pkl"),
}
OTHER = {"holidays": "paris", "paris": "holidays"}


def class_of(name: str, path: Path) -> str:
    """Training label: Holidays group (id // 100) or the Paris landmark in the file name."""
    if name == "holidays":
        return f"g{int(path.stem) // 100}"
    return path.stem.rsplit("_", 1)[0]


def training_folder(name: str, dst: Path) -> Path:
    """A folder per class of symlinks to the set's photos (what ``data.kind=folder`` reads)."""
    src = SHARED / "data" / SETS[name][0] / "jpg"
    for f in sorted(src.glob("*.jpg")):
        d = dst / class_of(name, f)
        d.mkdir(parents=True, exist_ok=True)
        link = d / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return dst


def labelled(name: str) -> tuple[list[Path], np.ndarray]:
    src = SHARED / "data" / SETS[name][0] / "jpg"
    paths = sorted(src.glob("*.jpg"))
    labels = np.unique([class_of(name, p) for p in paths], return_inverse=True)[1]
    return paths, labels


def same_class_pairs(labels: np.ndarray, rng: np.random.Generator, per_class: int = 300) -> np.ndarray:
    out = []
    for c in np.unique(labels):
        m = np.flatnonzero(labels == c)
        pairs = [(int(a), int(b)) for i, a in enumerate(m) for b in m[i + 1:]]
        if len(pairs) > per_class:
            pairs = [pairs[i] for i in rng.choice(len(pairs), per_class, replace=False)]
        out.extend(pairs)
    return np.asarray(out, dtype=np.int64)


def describe(model, paths, bboxes, *, imsize: int, scales, cache: Path | None, key: str | None) -> np.ndarray:
    """Descriptors (N, D) through cbir.extract, cached as .npy under a key naming model + settings."""
    from cbir.extract import extract

    f = None
    if cache is not None and key is not None:
        f = cache / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".npy")
        if f.is_file():
            return np.load(f, allow_pickle=False)
    res = extract(model, paths, bboxes=bboxes, imsize=imsize, scales=tuple(scales), progress=False)
    if res.failed:
        raise RuntimeError(f"images failed: {res.failed[:3]}")
    if f is not None:
        from cbir.fileio import atomic_save_npy

        atomic_save_npy(f, res.vectors)
    return res.vectors


def measure(model, model_key: str | None, args) -> dict:
    """Test E/M/H of ``model`` on the other set, raw and with Lw learned on the training set."""
    from cbir.datasets.revisitop import from_gnd_file
    from cbir.whitening import learn_lw

    test = OTHER[args.train]
    folder, gnd = SETS[test]
    bench = from_gnd_file(SHARED / "data" / folder / gnd)
    kw = dict(imsize=args.eval_size, scales=args.eval_scales, cache=args.cache)
    tag = lambda what: None if model_key is None else f"{model_key}|{what}|{args.eval_size}|{args.eval_scales}"  # noqa: E731
    db = describe(model, bench.db_paths, None, key=tag(f"{test}-db"), **kw)
    q = describe(model, bench.query_paths, bench.query_bboxes, key=tag(f"{test}-q"), **kw)
    out = {"raw": bench.evaluate(q @ db.T)["mAP"]}
    tpaths, labels = labelled(args.train)
    x = describe(model, tpaths, None, key=tag(f"{args.train}-train"), **kw)
    pairs = same_class_pairs(labels, np.random.default_rng(0))
    w = learn_lw(x, pairs, dim=args.lw_dim, shrinkage=args.lw_shrinkage)
    out["lw"] = bench.evaluate(w.apply(q) @ w.apply(db).T)["mAP"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", choices=sorted(SETS), required=True, help="set to fine-tune on (measured on the other)")
    ap.add_argument("--out", required=True, help="run folder (model.pt, result.json, training files)")
    ap.add_argument("--cache", default="runs/cache", help="descriptor cache of the starting model")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--imsize", type=int, default=256, help="training image side (square)")
    ap.add_argument("--eval-size", type=int, default=512)
    ap.add_argument("--eval-scales", type=float, nargs="+", default=[1.0])
    ap.add_argument("--val-size", type=int, default=320, help="image size of the validation split")
    ap.add_argument("--val-split", type=float, default=0.2)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--tuples", type=int, default=200, help="tuples (queries) per epoch")
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--batch-tuples", type=int, default=8)
    ap.add_argument("--loss", default="contrastive", choices=("contrastive", "triplet", "ap"))
    ap.add_argument("--margin", type=float, default=0.75)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--schedule", default="exponential")
    ap.add_argument("--hard-positives", action="store_true")
    ap.add_argument("--train-only", default="backbone.net.blocks.5,backbone.net.blocks.6,backbone.net.conv_head,pooling,whiten",
                    help="comma-separated parameter-name prefixes that train ('' = everything)")
    ap.add_argument("--whiten-layer", action="store_true", help="a trainable Lw whitening layer, initialised on the training set")
    ap.add_argument("--lw-dim", type=int, default=None)
    ap.add_argument("--lw-shrinkage", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-only", metavar="MODEL.pt",
                    help="no training: measure this fine-tuned model (e.g. a run's model.pt) against the start")
    args = ap.parse_args()

    import torch

    from cbir.model import build_model, load_model
    from cbir.training.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in SETS:
        if not (SHARED / "data" / SETS[name][0] / SETS[name][1]).is_file():
            print(f"reference data not found under {SHARED / 'data'} ({SETS[name][0]})", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.cache = Path(args.cache)
    t0 = time.time()
    start = build_model(args.model, pooling="gem", p=3.0)
    before = measure(start, f"{args.model}-imagenet-gem3", args)
    print(f"before: {json.dumps(before)}", file=sys.stderr, flush=True)

    if args.measure_only:
        after = measure(load_model(args.measure_only), None, args)
        f = lambda d: "/".join(f"{d[k]:.2f}" for k in ("easy", "medium", "hard"))  # noqa: E731
        result = {"train": args.train, "test": OTHER[args.train], "model": args.measure_only, "before": before,
                  "after": after, "settings": vars(args) | {"cache": str(args.cache)},
                  "wall_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d")}
        (out / "result_measure.json").write_text(json.dumps(result, indent=2, default=float))
        print(json.dumps({"test": OTHER[args.train], "before_raw": f(before["raw"]), "after_raw": f(after["raw"]),
                          "before_lw": f(before["lw"]), "after_lw": f(after["lw"])}))
        return 0
    data = training_folder(args.train, out / "data")
    cfg = {
        "model": {"name": args.model, "pooling": "gem", "weights": "default"},
        "data": {"kind": "folder", "root": str(data), "imsize": args.imsize,
                 "clean": {"k": 3.0, "min_size": 4} if args.train == "paris" else None},
        "mining": {"queries_per_epoch": args.tuples, "pool_size": 20000, "negatives": args.negatives,
                   "hard_positives": args.hard_positives, "batch_size": 32},
        "loss": {"name": args.loss, **({"margin": args.margin} if args.loss != "ap" else {})},
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 1e-6, "epochs": args.epochs,
                  "batch_tuples": args.batch_tuples, "schedule": args.schedule,
                  "train_only": [p for p in args.train_only.split(",") if p] or None},
        "whitening": {"init": "lw", "shrinkage": args.lw_shrinkage} if args.whiten_layer else None,
        "validation": {"split": args.val_split, "split_by": "classes" if args.train == "holidays" else "images",
                       "imsize": args.val_size, "every": 1, "patience": args.patience, "metric": "medium"},
        "out": str(out), "tensorboard": False, "bf16": True, "seed": args.seed,
    }
    res = train(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    best = load_model(out / "model.pt")
    after = measure(best, None, args)
    result = {
        "train": args.train, "test": OTHER[args.train], "before": before, "after": after,
        "best_epoch": res["best"], "settings": vars(args) | {"cache": str(args.cache)}, "config": cfg,
        "history": res["history"], "setup": {k: v for k, v in res["setup"].items() if k != "dropped_paths"},
        "wall_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d"),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=float))
    f = lambda d: "/".join(f"{d[k]:.2f}" for k in ("easy", "medium", "hard"))  # noqa: E731
    print(json.dumps({"test": OTHER[args.train], "before_raw": f(before["raw"]), "after_raw": f(after["raw"]),
                      "before_lw": f(before["lw"]), "after_lw": f(after["lw"]), "best_epoch": res["best"]["epoch"],
                      "wall_s": result["wall_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
