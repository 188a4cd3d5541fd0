"""``cbir tune``: choose whitening and re-ranking on labelled validation sets, write a recipe.

    cbir tune --val gnd_holidays805.pkl holidays-805/jpg --out holidays.recipe.json
    cbir tune --val my_photos_by_class/ --val gnd_rparis.pkl jpg/ --out mine.recipe.json --cache ~/.cache/cbir
    cbir tune --val gnd_holidays805.pkl --test gnd_rparis6k_subset250.pkl --out h.json   # + test figures
    cbir evaluate ... --recipe mine.recipe.json      # also: cbir search / index build / serve --recipe

--val takes a revisitop ground truth .pkl (images: jpg/ beside it, or the folder given after it)
or a folder with one sub-folder per class (every image with a class-mate is a query). The search
(whitening: none / PCA on the database / PCA or Lw learned on the validation sets, dimension;
then alpha-QE and DBA k; then diffusion k, kq, alpha, weight; with --verify, spatial verification
of the top 50 or 100) only ever scores the --val sets; --test sets are read after the recipe is
written, to report raw / defaults / recipe side by side.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import CLIError
from .options import add_extraction_options, add_model_options, extraction, model_spec


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
    p.add_argument("--verify", action="store_true",
                   help="also try spatial verification (top 50/100, verified first and/or verified query expansion); "
                        "extracts the local features (SIFT) of every set once, into the cache")
    m = p.add_argument_group("descriptors (as cbir evaluate)")
    add_model_options(m)
    add_extraction_options(m)
    m.add_argument("--no-crop", action="store_true", help="do not crop queries to their box")
    m.add_argument("--cache", metavar="DIR", help="extraction cache (default: cbir's cache folder)")
    p.set_defaults(func=cmd_tune)


def load_set(spec: list[str]):
    """A benchmark from ``[GND.pkl [IMAGES]]`` or ``[FOLDER]`` (every image with a class-mate a query)."""
    from ..pipeline import load_benchmark

    if len(spec) > 2:
        raise CLIError(f"--val/--test take a ground truth and optionally its image folder, got {spec}")
    return load_benchmark(spec[0], images=spec[1] if len(spec) == 2 else None, n_queries=10**9)


def describe(args: argparse.Namespace, bench):
    """(queries, database) descriptor matrices of ``bench``, through the pipeline's extraction cache."""
    from ..pipeline import default_cache_dir, describe as describe_bench

    imsize, scales = extraction(args, bench)
    q, db = describe_bench(bench, model_spec(args), imsize=imsize, scales=scales, crop=not args.no_crop,
                           device=args.device, batch_size=args.batch_size, precision=args.precision,
                           progress=True, cache_dir=args.cache or default_cache_dir())
    described = db.meta.get("described")
    if described is not None:
        print(f"descriptors of {bench.name}: " + ("nothing described (all from the extraction cache)" if not described
              else f"{described} images described, {db.meta.get('cache_hits', 0)} read from the extraction cache"),
              file=sys.stderr)
    return q.vectors, db.vectors, {k: v for k, v in db.meta.items() if k in ("model", "pooling", "imsize", "scales",
                                                                          "cropped_queries", "weights")}


def verifier_of(args: argparse.Namespace, bench):
    """The verifier of a set (its local features through the cache; queries cropped as described)."""
    from ..pipeline import default_cache_dir
    from ..pipeline.verifying import benchmark_verifier

    v = benchmark_verifier(bench, cache_dir=args.cache or default_cache_dir(), crop=not args.no_crop, progress=True,
                           device=args.device if str(args.device).startswith("cuda") else "cpu")
    print(f"{bench.name}: {v.extraction.line()}", file=sys.stderr)
    return v


def _figures(ds, q, db, recipe, verifier=None) -> dict:
    from ..rerank.compose import Rerank

    out = {}
    for label, fn in (("raw", Rerank().apply), ("defaults (--qe --dba --diffusion)",
                                                  Rerank(qe=2, dba=5, diffusion={}).apply),
                      ("recipe", (lambda a, b: recipe.apply(a, b, verifier)) if recipe.verify is not None
                       else recipe.apply)):
        out[label] = {k: round(float(v), 2) for k, v in ds.evaluate(fn(q, db)[0])["mAP"].items()}
    return out


def cmd_tune(args: argparse.Namespace) -> int:
    from ..rerank.recipe import Recipe
    from ..rerank.tune import Grid, LabelledSet, tune

    sets, settings = [], {}
    for spec in args.val:
        ds = load_set(spec)
        q, db, settings = describe(args, ds)
        sets.append(LabelledSet(ds.name, q, db, ds, verifier_of(args, ds) if args.verify else None))
    grid = Grid()
    if args.fast:
        from ..rerank.verify import VerifyParams

        grid = Grid(pca_power=(0.5,), shrinkage=(0.5,), dims=(256,), qe=(0, 2), dba=(0, 3), diffusion_k=(None,),
                    diffusion_kq=(3,), diffusion_alpha=(0.8,), diffusion_sim_weight=(0.5,),
                    verify=(VerifyParams(k=50, order="first", expand=True),))
    few = [f"{s.name} ({len(s.q)})" for s in sets if len(s.q) < 50]
    if few:
        print(f"note: few validation queries in {', '.join(few)}: the recipe may fit them and not transfer "
              "(a recipe tuned on rParis6k-250's 12 queries lowered Holidays; docs/rerank.md)", file=sys.stderr)
    recipe, trials = tune(sets, grid, progress=print)
    recipe.meta["descriptors"] = settings  # what the recipe was tuned for (a whitening is model-specific)
    recipe.save(args.out)
    print(f"recipe: whitening {recipe.spec.label()}; re-ranking {json.dumps(recipe.rerank.to_dict())}")
    print(f"wrote {args.out} (validation objective {recipe.meta['objective']['value']:.2f})")
    recipe = Recipe.load(args.out)  # what a user gets back
    report: dict = {"recipe": args.out, "trials": trials, "validation": {}, "test": {}}
    for s in sets:
        report["validation"][s.name] = _figures(s.dataset, s.q, s.db, recipe, s.verifier)
    for spec in args.test:  # read only now, after the recipe is written
        ds = load_set(spec)
        q, db, _ = describe(args, ds)
        report["test"][ds.name] = _figures(ds, q, db, recipe,
                                           verifier_of(args, ds) if recipe.verify is not None else None)
    for part in ("validation", "test"):
        for name, figs in report[part].items():
            for label, m in figs.items():
                print(f"{part:10s} {name:24s} {label:36s} " + "  ".join(f"{k} {v:6.2f}" for k, v in m.items()))
    if args.report:
        from ..fileio import atomic_write_json
        from ..report import jsonable

        atomic_write_json(args.report, jsonable(report))  # a figure with no positives (Hard on Holidays) is NaN
    return 0
