"""``cbir whiten``: learn a whitening (PCA or learned "Lw") from saved descriptors."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from . import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "whiten",
        help="learn a whitening (PCA or Lw) from saved descriptors",
        description=(
            "Learn x -> l2(P (x - mu)) from the descriptors in --features and save it to --out "
            "(.npz). Apply it with `--whiten FILE` in `cbir evaluate` / `cbir search`. "
            "Learn it on a set other than the one you evaluate on."
        ),
    )
    p.add_argument("--features", required=True, metavar="DIR", help="descriptor folder written by `cbir extract`")
    p.add_argument("--out", required=True, metavar="W.npz", help="where to write the whitening")
    p.add_argument("--method", choices=("pca", "lw"), default="pca",
                   help="pca: PCA whitening of all descriptors; lw: learned from matching pairs (Radenovic et al.) "
                        "(default: pca)")
    p.add_argument("--dim", type=int, default=None, metavar="D", help="keep the top D dimensions (default: all)")
    p.add_argument("--power", default="auto", metavar="P",
                   help="pca: eigenvalue power in [0, 2] (1 = full whitening, 0.5, 0 = rotation only) or auto: "
                        "0.5 x min(1, N / (10 D)) for N vectors of D dimensions, what the data support "
                        "(full whitening of 250 rparis6k-250 vectors lowered their Medium 86.6 -> 45.5; "
                        "measured, docs/models.md; default: auto)")
    p.add_argument("--shrinkage", default="auto", metavar="S",
                   help="shrink the covariance towards tr(C)/D I by S in [0,1]; auto: 0.5 when there are fewer "
                        "than 10 learning vectors (lw: pairs) per dimension, else 0 (measured, docs/models.md)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pairs", metavar="CSV", help="lw: CSV of matching pairs of descriptor ids (two columns; header optional)")
    src.add_argument("--gnd", metavar="GND.pkl",
                     help="lw: pairs (query, positive) from a revisitop ground truth (easy+hard positives)")
    p.set_defaults(func=handler)


def _lookup(ids: list[str]) -> dict[str, int]:
    """Row of each id, also reachable by the file stem (ground truths name images without paths)."""
    table = {}
    for i, name in enumerate(ids):
        table.setdefault(Path(name).stem, i)
    for i, name in enumerate(ids):
        table[name] = i
    return table


def _pairs_from_csv(path: Path, table: dict[str, int]) -> list[tuple[int, int]]:
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if rows and not any(c.strip() in table for c in rows[0][:2]):
        rows = rows[1:]  # header
    out = []
    for line, row in enumerate(rows, 1):
        if len(row) < 2:
            raise CLIError(f"{path}: row {line} needs two ids, got {row}")
        a, b = row[0].strip(), row[1].strip()
        for name in (a, b):
            if name not in table:
                raise CLIError(f"{path}: id {name!r} (row {line}) is not among the descriptors")
        out.append((table[a], table[b]))
    return out


def _pairs_from_gnd(path: Path, table: dict[str, int]) -> list[tuple[int, int]]:
    from ..datasets import load_gnd

    gnd = load_gnd(path)  # the restricted unpickler: a ground-truth file cannot run code
    qnames, dbnames, entries = gnd["qimlist"], gnd["imlist"], gnd["gnd"]
    out = []
    for qname, entry in zip(qnames, entries):
        if qname not in table:
            continue
        for j in list(entry.get("easy", [])) + list(entry.get("hard", [])):
            if dbnames[j] in table:
                out.append((table[qname], table[dbnames[j]]))
    return out


def _shrinkage(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise CLIError(f"--shrinkage must be a number in [0, 1] or auto, got {text!r}") from None


def _power(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise CLIError(f"--power must be a number in [0, 2] or auto, got {text!r}") from None


def handler(args: argparse.Namespace) -> int:
    import numpy as np

    from ..descriptors import Descriptors
    from ..whitening import learn_lw, learn_pca_whitening

    feats = Descriptors.load(args.features)
    x = np.asarray(feats.vectors, dtype=np.float64)
    if args.method == "pca":
        if args.pairs or args.gnd:
            raise CLIError("--pairs/--gnd are for --method lw")
        w = learn_pca_whitening(x, power=_power(args.power), dim=args.dim, shrinkage=_shrinkage(args.shrinkage))
    else:
        table = _lookup(feats.ids)
        if args.pairs:
            pairs = _pairs_from_csv(Path(args.pairs), table)
        elif args.gnd:
            pairs = _pairs_from_gnd(Path(args.gnd), table)
        else:
            raise CLIError("--method lw needs --pairs CSV or --gnd GND.pkl")
        if not pairs:
            raise CLIError("no matching pairs found among the descriptors")
        w = learn_lw(x, np.asarray(pairs), dim=args.dim, shrinkage=_shrinkage(args.shrinkage))
    w.meta.update(features=str(args.features), source_model=feats.meta.get("model"))
    w.meta = {k: v for k, v in w.meta.items() if v is not None}
    w.save(args.out)
    for note in w.meta.get("notes", []):
        print(note, file=sys.stderr)
    print(f"whitening ({w.meta['method']}, {w.in_dim} -> {w.out_dim} dims, learned on {w.meta['n_learn']} vectors) written to {args.out}")
    return 0
