"""``cbir tune``: choose whitening and re-ranking on labelled validation sets, write a recipe.

    cbir tune --val gnd_holidays805.pkl holidays-805/jpg --out holidays.recipe.json
    cbir tune --val my_photos_by_class/ --val gnd_rparis.pkl jpg/ --out mine.recipe.json --cache ~/.cache/cbir
    cbir tune --val gnd_holidays805.pkl --test gnd_rparis6k_subset250.pkl --out h.json   # + test figures
    cbir evaluate ... --recipe mine.recipe.json      # also: cbir search / index build / serve --recipe

--val takes a revisitop ground truth .pkl (images: jpg/ beside it, or the folder given after it)
or a folder with one sub-folder per class (every image with a class-mate is a query). The search
(whitening: none / PCA on the database / PCA or Lw learned on the validation sets, dimension;
then alpha-QE and DBA k; then diffusion k, kq, alpha, weight) only ever scores the --val sets;
--test sets are read after the recipe is written, to report raw / defaults / recipe side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from . import CLIError
from .extract import parse_scales


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="choose whitening + re-ranking on validation sets, write a recipe",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val", nargs="+", action="append", required=True, metavar=("GND.pkl|FOLDER", "IMAGES"),
                   help="a labelled validation set (repeat for several): a revisitop .pkl [image folder], "
                        "or a folder per class")
    p.add_argument("--test", nargs="+", action="append", default=[], metavar=("GND.pkl|FOLDER", "IMAGES"),
                   help="a set to report figures on after tuning (never used to choose)")
    p.add_argument("--out", required=True, metavar="RECIPE.json", help="where to write the recipe")
    p.add_argument("--report", metavar="FILE.json", help="also write every trial and the figures here")
    p.add_argument("--fast", action="store_true", help="a small search (a few candidates per step)")
    m = p.add_argument_group("descriptors")
    m.add_argument("--model", default="efficientnet_lite0", help="backbone name or a cbir model file")
    m.add_argument("--pooling", default="gem", help="pooling of a named backbone (default gem)")
    m.add_argument("--imsize", type=int, default=512, help="longest image side (default 512)")
    m.add_argument("--scales", default="1", help="comma-separated scales (default 1)")
    m.add_argument("--no-crop", action="store_true",
                   help="do not crop queries to their box (a query that is also a database image reuses its row)")
    m.add_argument("--device", default="auto")
    m.add_argument("--batch-size", type=int, default=None)
    m.add_argument("--cache", metavar="DIR", help="keep descriptors here, keyed by model, settings and images")
    p.set_defaults(func=cmd_tune)


def load_set(spec: list[str]):
    """A RetrievalDataset from ``[GND.pkl [IMAGES]]`` or ``[FOLDER]``."""
    from .. import datasets

    if len(spec) > 2:
        raise CLIError(f"--val/--test take a ground truth and optionally its image folder, got {spec}")
    path = Path(spec[0])
    if path.is_dir():
        if len(spec) == 2:
            raise CLIError(f"{path} is a folder per class: give no image folder after it")
        return datasets.from_folder(path, n_queries=10**9)
    if not path.is_file():
        raise FileNotFoundError(f"validation set not found: {path}")
    return datasets.from_gnd_file(path, images=spec[1] if len(spec) == 2 else None)


def describe(args: argparse.Namespace, ds, model) -> tuple[np.ndarray, np.ndarray]:
    """(queries, database) descriptors of ds, from the cache when there."""
    from ..extract import extract

    scales = parse_scales(args.scales)
    boxes = [None] * len(ds.query_ids) if args.no_crop else list(ds.query_bboxes)
    key = json.dumps({"model": model.describe(), "imsize": args.imsize, "scales": list(scales),
                      "db": [str(p) for p in ds.db_paths], "q": [str(p) for p in ds.query_paths],
                      "boxes": [None if b is None else [float(v) for v in b] for b in boxes]}, sort_keys=True)
    cache = None
    if args.cache:
        cache = Path(args.cache) / f"tune-{ds.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                return z["q"], z["db"]
    common = dict(imsize=args.imsize, scales=scales, device=args.device, batch_size=args.batch_size,
                  progress=True, strict=True)
    db = extract(model, ds.db_paths, **common).vectors
    row = {n: i for i, n in enumerate(ds.db_ids)}
    if args.no_crop and all(n in row for n in ds.query_ids):
        q = db[[row[n] for n in ds.query_ids]]
    else:
        q = extract(model, ds.query_paths, bboxes=boxes, **common).vectors
    if cache is not None:
        import io

        from ..fileio import atomic_write_bytes

        cache.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, q=q, db=db)
        atomic_write_bytes(cache, buf.getvalue())
    return q, db


def _figures(ds, q, db, recipe) -> dict:
    from ..rerank.options import Rerank

    out = {}
    for label, fn in (("raw", Rerank().apply), ("defaults (--qe --dba --diffusion)",
                                                  Rerank(qe=2, dba=5, diffusion={}).apply),
                      ("recipe", recipe.apply)):
        out[label] = {k: round(float(v), 2) for k, v in ds.evaluate(fn(q, db)[0])["mAP"].items()}
    return out


def cmd_tune(args: argparse.Namespace) -> int:
    from ..model import build_model, load_model
    from ..rerank.recipe import Recipe
    from ..rerank.tune import Grid, LabelledSet, tune

    model = load_model(args.model) if Path(args.model).is_file() else build_model(args.model, pooling=args.pooling)
    sets = []
    for spec in args.val:
        ds = load_set(spec)
        q, db = describe(args, ds, model)
        sets.append(LabelledSet(ds.name, q, db, ds))
    grid = Grid()
    if args.fast:
        grid = Grid(pca_power=(0.5,), shrinkage=(0.5,), dims=(256,), qe=(0, 2), dba=(0, 3), diffusion_k=(None,),
                    diffusion_kq=(3,), diffusion_alpha=(0.8,), diffusion_sim_weight=(0.5,))
    recipe, trials = tune(sets, grid, progress=print)
    recipe.meta["descriptors"] = {"model": model.describe(), "imsize": args.imsize,
                                  "scales": list(parse_scales(args.scales)), "cropped_queries": not args.no_crop}
    recipe.save(args.out)
    print(f"recipe: whitening {recipe.spec.label()}; re-ranking {json.dumps(recipe.rerank.to_dict())}")
    print(f"wrote {args.out} (validation objective {recipe.meta['objective']['value']:.2f})")
    recipe = Recipe.load(args.out)  # what a user gets back
    report: dict = {"recipe": args.out, "trials": trials, "validation": {}, "test": {}}
    for s in sets:
        report["validation"][s.name] = _figures(s.dataset, s.q, s.db, recipe)
    for spec in args.test:  # read only now, after the recipe is written
        ds = load_set(spec)
        q, db = describe(args, ds, model)
        report["test"][ds.name] = _figures(ds, q, db, recipe)
    for part in ("validation", "test"):
        for name, figs in report[part].items():
            for label, m in figs.items():
                print(f"{part:10s} {name:24s} {label:36s} " + "  ".join(f"{k} {v:6.2f}" for k, v in m.items()))
    if args.report:
        from ..fileio import atomic_write_json

        atomic_write_json(args.report, report)
    if not sets:
        raise CLIError("no validation set")
    return 0
