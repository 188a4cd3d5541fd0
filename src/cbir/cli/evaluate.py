"""``cbir evaluate``: mAP of a model (or of saved descriptors) on a benchmark, exact protocols.

    cbir evaluate --dataset demo                                  # bundled demo, offline, ~1 min
    cbir evaluate --dataset roxford5k --data-root data/           # after `cbir download roxford5k`
    cbir evaluate --dataset holidays --data-root holidays/        # INRIA Holidays, its official rule
    cbir evaluate --gnd gnd_rparis6k.pkl --images jpg/ --imsize 512 --scales 1
    cbir evaluate --gnd gnd_roxford5k.pkl --features feats/ --json res.json --plot top10.png

``--gnd`` takes a revisitop .pkl (Easy/Medium/Hard) or a folder of the original Oxford/Paris
``*_good/ok/junk/query.txt`` files (original protocol). With ``--features DIR`` (a `cbir extract`
output) query and database rows are looked up by the image names of the ground truth.
"""

from __future__ import annotations

import argparse
import sys

from . import CLIError
from .options import add_extraction_options, add_model_options, extraction, model_spec


#: What --dataset's help says of some names (every name of cbir.datasets.DATASETS is listed).
_ABOUT = {"demo": "bundled, offline", "holidays": "INRIA Holidays, official rule", "gldv2": "retrieval split"}


def dataset_help() -> str:
    """--dataset's help: every name of :data:`cbir.datasets.DATASETS` (one list for all of cbir)."""
    from ..datasets import DATASETS

    return "one of " + ", ".join(f"{n} ({_ABOUT[n]})" if n in _ABOUT else n for n in DATASETS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="mAP (revisitop E/M/H, original, GLDv2) of a model or of saved descriptors",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("benchmark")
    src.add_argument("--dataset", metavar="NAME", help=dataset_help())
    src.add_argument("--data-root", metavar="DIR", help="where the named dataset lives (`cbir download` target)")
    src.add_argument("--gnd", metavar="FILE|DIR",
                     help="revisitop ground-truth .pkl, or a folder of original *_query/good/ok/junk.txt files")
    src.add_argument("--images", metavar="DIR", help="image folder (default: jpg/ beside the ground truth)")
    src.add_argument("--features", metavar="DIR", help="descriptors from `cbir extract` (ids = image names)")
    src.add_argument("--query-features", metavar="DIR",
                     help="separate descriptors for the (cropped) queries; default: --features")
    src.add_argument("--distractors", metavar="DIR",
                     help="descriptors of distractor images (e.g. revisitop 1M, from `cbir extract`) appended "
                          "to the database as negatives; with --top-k they are read in blocks from the "
                          "memory-mapped files and only the top K kept (bounded memory; --device cuda: fp16 "
                          "on the GPU); without it, or with DBA/QE/diffusion, all rows are loaded")
    m = p.add_argument_group("model (with images)")
    add_model_options(m)
    add_extraction_options(m, per_benchmark=True)
    m.add_argument("--no-crop", action="store_true", help="do not crop queries to their box")
    m.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="keep the descriptors here, keyed by model, weights, settings and images, so that a "
                        "second run (e.g. other re-ranking options) describes nothing "
                        "(default: $CBIR_CACHE or ~/.cache/cbir/descriptors)")
    m.add_argument("--no-cache", action="store_true", help="describe the images again, keep nothing")
    out = p.add_argument_group("output")
    out.add_argument("--top-k", type=int, default=None,
                     help="rank only the top K per query (large databases, e.g. 1000 for +1M); positives "
                          "below count as missed (the standard +1M practice)")
    out.add_argument("--json", metavar="FILE", help="write the figures and settings as JSON (percent)")
    out.add_argument("--plot", metavar="FILE.png", help="PNG of each query's top-10: positive/negative/junk marked")
    out.add_argument("--plot-queries", type=int, default=20, metavar="N", help="at most N queries in --plot (default 20)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    from .rerank_options import add_arguments as add_rerank_arguments

    add_rerank_arguments(p)
    p.set_defaults(func=handler)


def load_benchmark(args: argparse.Namespace):
    """The benchmark selected by --dataset / --gnd (+ --images, or --features for the original protocol)."""
    from ..descriptors import Descriptors
    from ..pipeline import load_benchmark as load

    if args.dataset and args.gnd:
        raise CLIError("give either --dataset or --gnd, not both")
    if not args.dataset and not args.gnd:
        raise CLIError("say what to evaluate on: --dataset NAME (e.g. --dataset demo) or --gnd FILE")
    database_ids = None
    if args.gnd and not args.images and args.features:
        from pathlib import Path

        if Path(args.gnd).is_dir():
            database_ids = list(Descriptors.load(args.features, mmap=True).ids)
    if args.gnd and not args.images and not args.features:
        from pathlib import Path

        if Path(args.gnd).is_dir():
            raise CLIError("the original protocol needs --images DIR or --features DIR to know the database")
    return load(dataset=args.dataset, gnd=args.gnd, images=args.images, data_root=args.data_root,
                database_ids=database_ids)


def describe_settings(settings: dict) -> str:
    """One line naming what made the descriptors: model, pooling, size, scales (or the folder)."""
    if "imsize" in settings and settings.get("model"):
        return (f"{settings['model']} {settings.get('pooling', '')}, {settings['imsize']} px, "
                f"scales {','.join(f'{s:g}' for s in settings['scales'])}"
                + _cache_note(settings))
    what = f"saved in {settings.get('features')}"
    if settings.get("model"):
        what += f" ({settings['model']} {settings.get('pooling', '')})".rstrip()
    return what


def _cache_note(settings: dict) -> str:
    """" (cached: nothing described)", " (N described, M from the cache)" or ""."""
    if settings.get("cache") == "hit":
        return " (cached: nothing described)"
    if settings.get("cache_hits"):
        return f" ({settings.get('described', 0)} images described, {settings['cache_hits']} read from the cache)"
    return ""


def handler(args: argparse.Namespace) -> int:
    from ..fileio import atomic_write_json
    from ..pipeline import default_cache_dir, describe, lookup, score
    from ..report import format_table, jsonable, plot_top10
    from .rerank_options import settings_from_args

    if args.images and args.features:
        raise CLIError("give either --images or --features, not both")
    if args.query_features and not args.features:
        raise CLIError("--query-features goes with --features")
    rerank = settings_from_args(args)  # a Rerank, or the --recipe
    bench = load_benchmark(args)
    if args.features:
        q, db = lookup(bench, args.features, args.query_features)
    else:
        spec = model_spec(args)
        imsize, scales = extraction(args, bench)
        cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
        q, db = describe(bench, spec, imsize=imsize, scales=scales, crop=not args.no_crop, device=args.device,
                         batch_size=args.batch_size, precision=args.precision, progress=not args.quiet,
                         cache_dir=cache)
    local_cache = None
    if rerank.verify is not None:  # the local features live in the same cache (a temporary one with --no-cache)
        import tempfile

        local_cache = (tempfile.mkdtemp(prefix="cbir-local-") if args.no_cache
                       else (args.cache_dir or default_cache_dir()))
    res = score(bench, q, db, rerank, top_k=args.top_k, distractors=args.distractors, keep_scores=bool(args.plot),
                device=args.device if str(args.device).startswith("cuda") else "cpu", cache_dir=local_cache,
                progress=not args.quiet)
    if args.no_cache and local_cache is not None:
        import shutil

        shutil.rmtree(local_cache, ignore_errors=True)
    settings = {k: v for k, v in db.meta.items() if k != "part"}
    if args.features:
        settings = {"features": str(args.features), "query_features": str(args.query_features or args.features),
                    "descriptor_meta": {k: v for k, v in db.meta.items() if k not in ("features",)}}
    if args.distractors:
        settings["distractors"] = {"dir": str(args.distractors), "n": res["n_distractors"]}
    applied = res["applied"]

    extra = f" + {res['n_distractors']} distractors" if args.distractors else ""
    print(f"{bench.name}: {len(bench.db_ids)} database images{extra}, {len(bench.query_ids)} queries "
          f"({bench.protocol} protocol)")
    shown = settings if not args.features else {**settings["descriptor_meta"], "features": args.features}
    if args.features:
        shown.pop("imsize", None)
    print(f"descriptors: {describe_settings(shown)}" + (f"; re-ranking: {', '.join(applied)}" if applied else ""))
    if "verification" in res:
        print(verification_line(res["verification"], applied.get("verify", {})))
    print(format_table(res))

    if args.json:
        figures = {k: v for k, v in res.items() if k not in ("scores", "applied", "n_distractors", "verifier")}
        record = jsonable({**figures, "dataset": bench.name, "protocol": bench.protocol, "n_db": len(bench.db_ids),
                           "n_queries": len(bench.query_ids), "settings": settings, "rerank": applied,
                           "ground_truth": bench.info})
        record["ground_truth"].pop("labels", None)
        atomic_write_json(args.json, record)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        n = plot_top10(args.plot, bench, res["scores"], args.plot_queries, verifier=res.get("verifier"),
                       min_inliers=rerank.verify.min_inliers if rerank.verify is not None else None)
        extra = " and the verified matches of each beside it (-matches.png)" if res.get("verifier") is not None else ""
        print(f"wrote {args.plot} ({n} queries){extra}", file=sys.stderr)
    return 0


def verification_line(rec: dict, applied: dict) -> str:
    """One line on spatial verification: what was verified, how many were, what it cost."""
    local = rec.get("local_features") or {}
    parts = [f"verification: top {applied.get('k')} per query, >= {applied.get('min_inliers')} inliers, "
             f"{applied.get('verified', 0):.1f} verified per query ({applied.get('queries_verified', 0)} queries with one)"]
    if applied.get("same_image"):
        parts.append(f"{applied['same_image']} queries' own photos (never their expansion)")
    parts.append(f"{rec.get('pairs', 0)} pairs, {1000 * rec.get('verify_seconds_per_query', 0.0):.0f} ms/query "
                 f"matching + RANSAC")
    if local:
        parts.append(f"local features {local.get('settings')}: {local.get('extracted', 0)} extracted, "
                     f"{local.get('from_cache', 0)} from the cache")
    return "; ".join(parts)
