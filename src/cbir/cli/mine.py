"""``cbir mine FOLDER --out DIR``: training tuples from unlabelled photos (kNN, verification, clusters, SfM)."""

from __future__ import annotations

import argparse
import json
import sys

from .options import add_model_options
from .pair_options import (StageBars, add_pair_options, add_running_options, flag_error, pair_settings_from_args,
                           workers_from_args)

DESCRIPTION = """\
Build training data from photos nobody labelled, as Radenovic et al. (TPAMI'18) do: global kNN
(each photo's --k nearest by the global descriptor) -> SIFT of every photo -> matching and geometric
verification of the candidate pairs (RANSAC inliers) -> graph of verified pairs (>= --min-inliers)
-> clusters (connected components; a bridge between two groups needs --bridge-inliers) -> pycolmap
incremental mapping of every cluster of >= --min-model-images photos (3D models, shared 3D points)
-> tuples. No label or ground-truth file is read.

Writes DIR/tuples.pkl (retrieval-SfM format with inlier counts "pinliers" and shared 3D points
"p3d" per (query, positive); splits "train" and "val", whole clusters held out), DIR/val_gnd.pkl
(the val split as a revisitop ground truth), DIR/summary.json, and the work: DIR/pairs/ (global
descriptors, candidate pairs, local features, verification chunks, clusters), DIR/reconstruct/
(a COLMAP database and the models of each cluster).

Interrupted (even kill -9)? Run the same command again: finished stages and chunks are kept and
the result is the same as an uninterrupted run. Other settings or photos in DIR are refused (use
the same options, another DIR, or --restart to start over).
"""

EPILOG = """\
examples:
  cbir mine photos/ --out mined/
  cbir mine photos/ --out mined/ --k 20 --min-inliers 20 --workers 2
  cbir train configs/mined_sfm.yaml data.pkl=mined/tuples.pkl data.root=photos/ \\
      validation.gnd=mined/val_gnd.pkl validation.images=photos/
"""

STAGES = ("describe", "pairs", "features", "verify", "graph", "reconstruct", "tuples")
LABELS = {"describe": "global descriptors", "pairs": "candidate pairs", "features": "local features",
          "verify": "verification", "graph": "clusters", "reconstruct": "3D models", "tuples": "tuples"}


def register(sub) -> None:
    p = sub.add_parser("mine", help="training tuples from unlabelled photos (verification + SfM)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="FOLDER", help="folder of photos (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (rerun the same command to resume)")
    g = p.add_argument_group("global descriptor (candidate pairs)")
    add_model_options(g)
    v = p.add_argument_group("local features and verification")
    add_pair_options(g, v)
    r = p.add_argument_group("reconstruction and tuples")
    r.add_argument("--no-reconstruct", action="store_true", help="skip the SfM step (positives: verified pairs only)")
    r.add_argument("--min-model-images", type=int, default=3, metavar="N",
                   help="clusters of at least N photos are reconstructed (default: 3)")
    r.add_argument("--min-shared-points", type=int, default=15, metavar="N",
                   help="photos of a cluster sharing N 3D points are positives even if not a verified pair "
                        "(default: 15)")
    r.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="clusters held out whole as the val split (default: 0.2)")
    r.add_argument("--seed", type=int, default=0, help="RANSAC, mapper and split seed (default: 0)")
    o = p.add_argument_group("running")
    add_running_options(o, "summary")
    o.add_argument("--restart", action="store_true", help="empty DIR and start over")
    p.set_defaults(func=handler)


def settings_from_args(args: argparse.Namespace):
    """The :class:`cbir.sfm.settings.MineSettings` of the options (errors name the flag)."""
    from ..schema import SchemaError
    from ..sfm.settings import MineSettings

    pairs = pair_settings_from_args(args)
    flags = {"min_model_images": "--min-model-images", "min_shared_points": "--min-shared-points",
             "val_fraction": "--val-fraction", "seed": "--seed"}
    try:
        return MineSettings(pairs=pairs, reconstruct=not args.no_reconstruct, min_model_images=args.min_model_images,
                            min_shared_points=args.min_shared_points, val_fraction=args.val_fraction, seed=args.seed)
    except SchemaError as exc:
        raise flag_error(exc, flags) from None


def summary_lines(s: dict) -> list[str]:
    secs = s.get("seconds", {})
    times = ", ".join(f"{LABELS.get(k, k)} {secs[k]:.0f} s" for k in STAGES if k in secs)
    return [
        f"photos: {s['photos']} ({s['failed']} unreadable)",
        f"pairs: {s['candidate_pairs']} candidates, {s['verified_pairs']} verified, {s['cut_bridges']} weak bridges cut",
        f"clusters: {s['clusters']} ({s['clustered_photos']} photos, largest {s['largest_cluster']})",
        f"3D models: {s['models']} of {s['reconstructed_clusters']} clusters tried, {s['registered_photos']} photos "
        f"registered, {s['points3D']} points",
        f"tuples: train {s['train']['photos']} photos / {s['train']['clusters']} clusters / {s['train']['pairs']} "
        f"(query, positive); val {s['val']['photos']} / {s['val']['clusters']} / {s['val']['pairs']}; "
        f"{s['positive_pairs_3d_only']} positive pairs from 3D models only",
        f"time: {times}",
    ]


def handler(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..sfm.mine import SUMMARY, TUPLES, VAL_GND, mine

    settings = settings_from_args(args)
    workers = workers_from_args(args)
    out = Path(args.out)
    bars = StageBars(args.quiet, LABELS, ("describe", "features", "reconstruct"))
    try:
        summary = mine(args.folder, out, settings, progress=bars, device=args.device, workers=workers,
                       restart=args.restart)
    finally:
        bars.close()
    for key, reason in summary.get("failed_photos", {}).items():
        print(f"unreadable: {key}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
        return 0
    for line in summary_lines(summary):
        print(line)
    wrote = [str(out / TUPLES)] + ([str(out / VAL_GND)] if (out / VAL_GND).is_file() else []) + [str(out / SUMMARY)]
    print(f"wrote {', '.join(wrote)}")
    return 0
