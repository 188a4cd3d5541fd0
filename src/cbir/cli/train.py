"""``cbir train CONFIG [key=value …]``: fine-tune a retrieval model (see cbir.training.trainer)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model on your photos (tuples mined every epoch)",
        description=(
            "Fine-tune a RetrievalNet from a YAML (.yaml/.yml) or TOML (.toml) config; key=value "
            "arguments override config entries (e.g. optim.lr=1e-5 data.imsize=256). Writes OUT/last.pt "
            "(checkpoint, every epoch), OUT/model.pt (usable by `cbir extract --model`), OUT/history.json "
            "and TensorBoard scalars in OUT/tb. Multi-GPU: torchrun --nproc_per_node N -m cbir train CONFIG."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="training config (.yaml, .yml or .toml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, dotted keys")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--out", help="output folder (same as out=DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the merged config as JSON and exit")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..training.trainer import load_config, train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(cfg, indent=2))
        return 0
    result = train(cfg, resume=args.resume, progress=not args.no_progress,
                   log=lambda msg: print(msg, file=sys.stderr, flush=True))
    last = result["history"][-1] if result["history"] else {}
    print(json.dumps({"out": result["out"], "epochs": last.get("epoch"), "loss": last.get("loss"),
                      "val": last.get("val"), "setup": {k: v for k, v in result["setup"].items() if k != "dropped_paths"}}))
    return 0
