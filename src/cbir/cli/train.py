"""``cbir train CONFIG [key=value …] [options]``: fine-tune a retrieval model (see cbir.training.trainer)."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Fine-tune a RetrievalNet from a YAML (.yaml/.yml) or TOML (.toml) config. KEY=VALUE arguments
override config entries (dotted keys, e.g. optim.lr=1e-5 data.root=photos/); options and
overrides may come in any order. Every input the config names is checked before any work starts.

Writes OUT/last.pt (checkpoint, every epoch; --resume continues from it exactly), OUT/model.pt
(usable by `cbir extract --model`; with validation, the best validated epoch, the start included),
OUT/history.json and TensorBoard scalars in OUT/tb.
Multi-GPU: torchrun --nproc_per_node N -m cbir train CONFIG.

examples:
  cbir train configs/own_photos.yaml data.root=photos/ out=runs/mine
  cbir train configs/own_photos.yaml data.root=photos/ --resume out=runs/mine optim.epochs=40
  cbir train configs/own_photos.yaml --print-config validation.split=0.3
  cbir train configs/own_photos.yaml data.root=photos/ --estimate   # how long it would take, then stop

Before the first epoch it prints the estimated time, measured on a few real training steps, the
mining speed and the first validation pass, with the config keys that shorten it. At the end it says
which epoch it kept and why ("kept epoch 0 (the starting model): fine-tuning did not improve the
held-out photos ..."). The last line of the output is a JSON summary (NaN written as null).
"""


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last.pt")
    p.add_argument("--out", help="output folder (same as out=DIR)")
    p.add_argument("--no-progress", action="store_true", default=None, help="no progress bars")
    p.add_argument("--print-config", action="store_true", default=None,
                   help="print the merged, checked config as JSON and exit")
    p.add_argument("--estimate", action="store_true", default=None,
                   help="measure a few training steps and the first validation pass, print the estimated time "
                        "(and the config keys that shorten it) and exit without training")


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model on your photos (tuples mined every epoch)",
                       usage="cbir train CONFIG [KEY=VALUE ...] [--resume] [--out DIR] [--no-progress] [--print-config] "
                             "[--estimate]",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs=argparse.REMAINDER, metavar="CONFIG [KEY=VALUE ...]",
                   help="training config (.yaml, .yml or .toml), then config overrides with dotted keys")
    _options(p)
    p.set_defaults(func=handler)


def parse_items(args: argparse.Namespace) -> argparse.Namespace:
    """Split ``items`` (everything after the first positional) into config, overrides and options,
    in any order; options given before the config are kept."""
    from . import CLIError

    class _Inner(argparse.ArgumentParser):
        def error(self, message: str):  # one line through the CLI, no usage dump, no exit here
            raise CLIError(f"{message} (usage: cbir train CONFIG [KEY=VALUE ...] [--resume] [--out DIR])")

    inner = _Inner(prog="cbir train", add_help=False)
    inner.add_argument("config")
    inner.add_argument("overrides", nargs="*")
    _options(inner)
    if not args.items:
        raise CLIError("a training config is needed (usage: cbir train CONFIG [KEY=VALUE ...] [--resume] [--out DIR])")
    ns = inner.parse_intermixed_args(args.items)
    for key in ("resume", "out", "no_progress", "print_config", "estimate"):
        if getattr(ns, key) is None:
            setattr(ns, key, getattr(args, key))
    for key in ("resume", "no_progress", "print_config", "estimate"):
        setattr(ns, key, bool(getattr(ns, key)))
    return ns


def handler(args: argparse.Namespace) -> int:
    from ..report import jsonable
    from ..training.config import load_config, missing_inputs
    from ..training.trainer import train

    ns = parse_items(args)
    overrides = list(ns.overrides)
    if ns.out:
        overrides.append(f"out={ns.out}")
    cfg = load_config(ns.config, overrides)
    if ns.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    missing = missing_inputs(cfg, resume=ns.resume)
    if missing:
        raise FileNotFoundError("missing training inputs: " + "; ".join(missing))
    result = train(cfg, resume=ns.resume, progress=not ns.no_progress, estimate_only=ns.estimate,
                   log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if ns.estimate:
        print(json.dumps(jsonable({"estimate": result.get("estimate")}), allow_nan=False))
        return 0
    last = result["history"][-1] if result["history"] else {}
    summary = {"out": result["out"], "epochs": last.get("epoch"), "loss": last.get("loss"), "val": last.get("val"),
               "best": result.get("best"), "kept": result.get("kept"), "estimate": result.get("estimate"),
               "setup": {k: v for k, v in result["setup"].items() if k != "dropped_paths"}}
    print(json.dumps(jsonable(summary), allow_nan=False))  # NaN (a diverged or empty figure) is null: valid JSON
    return 0
