"""``cbir adapt FOLDER --out RECIPE.json``: a recipe for your own photos, learned with no label."""

from __future__ import annotations

import argparse
import json

from .options import add_model_options
from .pair_options import (StageBars, add_pair_options, add_running_options, flag_error, pair_settings_from_args,
                           workers_from_args)

DESCRIPTION = """\
Adapt cbir to a collection nobody labelled: mine verified pairs inside FOLDER (each photo's --k
nearest neighbours by the global descriptor -> SIFT -> matching and RANSAC, >= --min-inliers
inliers -> clusters of verified pairs), learn a whitening from those pairs (Lw, --lw-dim,
--lw-shrinkage), and choose the re-ranking (alpha-QE, DBA, diffusion; spatial verification with
--tune-verify) on them as pseudo ground truth: every photo with a verified partner is a query, the
photos of its cluster are its positives (--search-positives). The clusters are split in two folds: the whitening is
learned on one fold's pairs and the re-ranking scored on the other fold's queries (and the other
way round), so nothing is judged on the pairs it was learned from.

Writes RECIPE.json and RECIPE.whiten.npz beside it (the learned whitening), for
  cbir evaluate / search / index build / serve --recipe RECIPE.json   (add --verify 100 to verify)
The recipe is made for the global descriptor it was learned with (the --model/--pooling/--imsize/
--scales given here; default Lite0 + GeM, 512 px x 3 scales): use the same ones with it.

Only image files (.jpg, .png, ...) of FOLDER are opened: no label, no ground-truth file. The mining
work is kept in the cache folder (CACHE/adapt-v1/): run the same command again, even after a kill,
and it continues; photos added or changed since are mined again.
"""

EPILOG = """\
examples:
  cbir adapt photos/ --out photos.recipe.json
  cbir evaluate --gnd gnd.pkl --images photos/ --recipe photos.recipe.json --verify 100
  cbir index build photos/ --out photos.index --recipe photos.recipe.json
  cbir adapt photos/ --out r.json --k 20 --min-inliers 20 --fast --json
"""

LABELS = {"describe": "global descriptors", "pairs": "candidate pairs", "features": "local features",
          "verify": "verification", "graph": "clusters", "whitening": "learned whitening", "tune": "re-ranking search"}


def register(sub) -> None:
    p = sub.add_parser("adapt", help="a recipe (whitening + re-ranking) learned from your unlabelled photos",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="FOLDER", help="folder of photos (searched recursively)")
    p.add_argument("--out", required=True, metavar="RECIPE.json",
                   help="the recipe to write (and RECIPE.whiten.npz beside it)")
    g = p.add_argument_group("global descriptor (candidates, whitening; use the same with the recipe)")
    add_model_options(g)
    v = p.add_argument_group("local features and verification (mining)")
    add_pair_options(g, v)
    w = p.add_argument_group("what is learned")
    w.add_argument("--positives", choices=("cluster", "verified"), default="verified",
                   help="a photo's matches: only its verified partners, or every photo of its cluster (default: verified)")
    w.add_argument("--search-positives", choices=("cluster", "verified", "same"), default="cluster",
                   help="a query's matches in the pseudo ground truth that scores the re-ranking search: every photo of "
                        "its cluster, its verified partners, or the same as --positives (default: cluster)")
    w.add_argument("--lw-dim", type=int, default=512, metavar="D",
                   help="dimensions kept by the learned whitening (default: 512; 0: all)")
    w.add_argument("--lw-shrinkage", type=float, default=0.5, metavar="S",
                   help="shrinkage of Lw's within-pair covariance towards its mean variance, in [0, 1] (default: 0.5)")
    w.add_argument("--fast", action="store_true", help="a small re-ranking search (a few candidates per step)")
    w.add_argument("--tune-verify", action="store_true",
                   help="also try spatial verification in the search (extracts SIFT at the verifier's settings; the "
                        "pseudo ground truth is made by verification, so it favours it: off by default)")
    w.add_argument("--min-pairs", type=int, default=10, metavar="N",
                   help="refuse with fewer verified pairs than this (default: 10)")
    o = p.add_argument_group("running")
    o.add_argument("--cache", metavar="DIR", help="cache folder (default: cbir's, $CBIR_CACHE)")
    add_running_options(o, "report")
    o.add_argument("--report", metavar="FILE.json", help="also write the report with every trial here")
    p.set_defaults(func=handler)


def settings_from_args(args: argparse.Namespace):
    """The :class:`cbir.adapt.AdaptSettings` of the options (errors name the flag)."""
    from ..adapt import AdaptSettings
    from ..schema import SchemaError

    pairs = pair_settings_from_args(args)
    flags = {"lw_dim": "--lw-dim", "lw_shrinkage": "--lw-shrinkage", "min_pairs": "--min-pairs"}
    try:
        return AdaptSettings(pairs=pairs, positives=args.positives, search_positives=args.search_positives,
                             lw_dim=args.lw_dim or None,
                             lw_shrinkage=args.lw_shrinkage, search="fast" if args.fast else "full",
                             verify=args.tune_verify, min_pairs=args.min_pairs)
    except SchemaError as exc:
        raise flag_error(exc, flags) from None


def report_lines(r: dict) -> list[str]:
    w, pg = r["whitening"], r["pseudo_gt"]
    rr = {k: v for k, v in r["rerank"].items() if v is not None and k != "whiten"}
    secs = ", ".join(f"{LABELS.get(k, k)} {v:.0f} s" for k, v in r["seconds"].items())
    return [
        f"photos: {r['photos']} ({r['unreadable']} unreadable, {r['other_files']} other files not read)",
        f"verified pairs: {r['verified_pairs']} of {r['candidate_pairs']} candidates; {r['clusters']} clusters "
        f"({r['clustered_photos']} photos); {r['matching_pairs']} matching pairs for the whitening",
        f"whitening: Lw {w['out_dim']}-d, shrinkage {w['shrinkage']:g}",
        f"re-ranking: {json.dumps(rr) if rr else 'none'}",
        f"pseudo ground truth ({r['queries']} queries, 2 cluster folds, Medium mAP): raw {pg['raw']:.2f}, "
        f"Lw {pg['lw']:.2f}, recipe {pg['recipe']:.2f}",
        f"time (mining: summed over the runs that did it; whitening, search: this run): {secs}",
    ]


def handler(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..adapt import adapt
    from . import CLIError

    settings = settings_from_args(args)
    workers = workers_from_args(args)
    folder, out = Path(args.folder), Path(args.out)
    if not folder.is_dir():
        raise CLIError(f"photo folder not found: {folder}")
    if out.suffix.lower() != ".json":
        raise CLIError(f"--out must name a .json file (the recipe), got {out}")
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder; give the recipe's file name")
    if not out.parent.is_dir():
        raise CLIError(f"--out: folder {out.parent} does not exist")
    bars = StageBars(args.quiet, LABELS, ("describe", "features"))
    try:
        recipe, report = adapt(folder, settings, cache_dir=args.cache, device=args.device, workers=workers,
                               progress=bars, exclude=None)
    finally:
        bars.close()
    recipe.save(out)
    doc = report.to_dict()
    if args.report:
        from ..fileio import atomic_write_json
        from ..report import jsonable

        atomic_write_json(args.report, jsonable({"recipe": str(out), **report.to_dict(trials=True)}))
    if args.json:
        print(json.dumps({"recipe": str(out), **doc}))
        return 0
    for line in report_lines(doc):
        print(line)
    print(f"wrote {out} (+ {out.with_name(out.stem + '.whiten.npz').name}); use it with --recipe {out}")
    return 0
