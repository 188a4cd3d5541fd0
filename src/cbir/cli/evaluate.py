"""``cbir evaluate``: mAP of a model (or of saved descriptors) on a benchmark, exact protocols.

    cbir evaluate --dataset demo                                  # bundled demo, offline, ~1 min
    cbir evaluate --dataset roxford5k --data-root data/           # after `cbir download roxford5k`
    cbir evaluate --gnd gnd_rparis6k.pkl --images jpg/ --imsize 512 --scales 1
    cbir evaluate --gnd gnd_roxford5k.pkl --features feats/ --json res.json --plot top10.png

``--gnd`` takes a revisitop .pkl (Easy/Medium/Hard) or a folder of the original Oxford/Paris
``*_good/ok/junk/query.txt`` files (original protocol). With ``--features DIR`` (a `cbir extract`
output) query and database rows are looked up by the image names of the ground truth.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import CLIError
from .extract import parse_scales, resolve_resolution

PROTO_LABEL = {"easy": "Easy", "medium": "Medium", "hard": "Hard", "all": "all"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="mAP (revisitop E/M/H, original, GLDv2) of a model or of saved descriptors",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("benchmark")
    src.add_argument("--dataset", metavar="NAME",
                     help="demo (bundled), roxford5k, rparis6k, oxford5k, paris6k, gldv2, holidays (official rule; "
                          "a rotations.txt beside its jpg/ applies the manual rotations)")
    src.add_argument("--data-root", metavar="DIR", help="where the named dataset lives (`cbir download` target)")
    src.add_argument("--gnd", metavar="FILE|DIR",
                     help="revisitop ground-truth .pkl, or a folder of original *_query/good/ok/junk.txt files")
    src.add_argument("--images", metavar="DIR", help="image folder (default: jpg/ beside the ground truth)")
    src.add_argument("--features", metavar="DIR", help="descriptors from `cbir extract` (ids = image names)")
    src.add_argument("--query-features", metavar="DIR",
                     help="separate descriptors for the (cropped) queries; default: --features")
    src.add_argument("--distractors", metavar="DIR",
                     help="descriptors of distractor images (e.g. revisitop 1M, from `cbir extract`) appended "
                          "to the database as negatives; use with --top-k for large sets")
    m = p.add_argument_group("model (with images)")
    m.add_argument("--model", default="efficientnet_lite0",
                   help="backbone name, or a model file saved by cbir (default efficientnet_lite0)")
    m.add_argument("--pooling", default="gem", help="spoc, mac, gem, rmac, crow, bow (default gem)")
    m.add_argument("--weights", default="default", help="backbone weights: default (offline ImageNet), or a file")
    m.add_argument("--imsize", type=int, default=None,
                   help="longest image side in pixels (default: the model's, see `cbir models`; demo: 512)")
    m.add_argument("--scales", default=None,
                   help="comma-separated scales, combined by the pooling's mean "
                        "(default: the model's, e.g. 1,0.7071,0.5; demo: 1, as its photos are already small)")
    m.add_argument("--no-crop", action="store_true", help="do not crop queries to their box")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    m.add_argument("--batch-size", type=int, default=None)
    out = p.add_argument_group("output")
    out.add_argument("--top-k", type=int, default=None,
                     help="rank only the top K per query (large databases); positives below count as missed")
    out.add_argument("--json", metavar="FILE", help="write the figures and settings as JSON (percent)")
    out.add_argument("--plot", metavar="FILE.png", help="PNG of each query's top-10: positive/negative/junk marked")
    out.add_argument("--plot-queries", type=int, default=20, metavar="N", help="at most N queries in --plot (default 20)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    try:
        from ..rerank.options import add_arguments as add_rerank_arguments
    except ImportError:  # re-ranking module absent: evaluate without it
        add_rerank_arguments = None
    if add_rerank_arguments is not None:
        add_rerank_arguments(p)
    p.set_defaults(func=handler)


# --------------------------------------------------------------------------------------------


def load_benchmark(args: argparse.Namespace):
    """The RetrievalDataset selected by --dataset / --gnd (+ --images)."""
    from .. import datasets

    if args.dataset and args.gnd:
        raise CLIError("give either --dataset or --gnd, not both")
    if args.dataset:
        ds = datasets.load_dataset(args.dataset, args.data_root)
        if args.images:  # same relative layout, another folder
            base = Path(ds.info.get("images") or ds.info.get("root") or ".")

            def move(p: Path) -> Path:
                try:
                    return Path(args.images) / p.relative_to(base)
                except ValueError:
                    return Path(args.images) / p.name

            ds.db_paths = [move(p) for p in ds.db_paths]
            ds.query_paths = [move(p) for p in ds.query_paths]
        return ds
    if not args.gnd:
        raise CLIError("say what to evaluate on: --dataset NAME (e.g. --dataset demo) or --gnd FILE")
    gnd = Path(args.gnd)
    if gnd.is_dir():
        if args.images:
            names = sorted(p.stem for p in Path(args.images).glob("*.jpg"))
        elif args.features:
            from ..descriptors import Descriptors

            names = list(Descriptors.load(args.features, mmap=True).ids)
        else:
            raise CLIError("the original protocol needs --images DIR or --features DIR to know the database")
        return datasets.from_original_gt(gnd, names, images=args.images, name=gnd.name)
    return datasets.from_gnd_file(gnd, images=args.images)


def _lookup(desc, names: list[str], what: str) -> np.ndarray:
    try:
        rows = desc.row_of(names)
    except KeyError as exc:
        raise CLIError(f"{what}: {exc.args[0]}") from exc
    return np.asarray(desc.vectors[rows], dtype=np.float32)


def descriptors_from_features(args: argparse.Namespace, ds) -> tuple[np.ndarray, np.ndarray, dict]:
    from ..descriptors import Descriptors

    feats = Descriptors.load(args.features, mmap=True)
    qfeats = Descriptors.load(args.query_features, mmap=True) if args.query_features else feats
    db = _lookup(feats, ds.db_ids, f"database image of {ds.name} missing in {args.features}")
    q = _lookup(qfeats, ds.query_ids, f"query of {ds.name} missing in {args.query_features or args.features}")
    settings = {"features": str(args.features), "query_features": str(args.query_features or args.features),
                "descriptor_meta": {k: v for k, v in feats.meta.items() if k not in ("job",)}}
    return q, db, settings


def descriptors_from_images(args: argparse.Namespace, ds) -> tuple[np.ndarray, np.ndarray, dict]:
    from ..extract import extract, fit_bow
    from ..model import build_model, load_model

    small = ds.name == "demo"
    if Path(args.model).is_file():
        model = load_model(args.model)
    else:
        model = build_model(args.model, pooling=args.pooling, weights=args.weights)
    if small:
        args.imsize = 512 if args.imsize is None else args.imsize
        args.scales = args.scales or "1"
    args.imsize, scales = resolve_resolution(args, model)
    missing = [p for p in list(ds.db_paths[:1]) + list(ds.query_paths[:1]) if not Path(p).is_file()]
    if missing:
        raise CLIError(f"image not found: {missing[0]} (give --images DIR, or `cbir download {ds.name}`)")
    if getattr(model.pooling, "name", "") == "bow" and not bool(model.pooling.fitted):
        fit_bow(model, ds.db_paths, imsize=args.imsize, device=args.device)
    common = dict(imsize=args.imsize, scales=scales, device=args.device, batch_size=args.batch_size,
                  progress=not args.quiet, strict=True)
    boxes = None if args.no_crop else ds.query_bboxes
    t0 = time.perf_counter()
    db = extract(model, ds.db_paths, **common)
    q = extract(model, ds.query_paths, bboxes=boxes, **common)
    seconds = time.perf_counter() - t0
    settings = {**model.describe(), "imsize": args.imsize, "scales": list(scales),
                "cropped_queries": not args.no_crop and any(b is not None for b in ds.query_bboxes),
                "extract_seconds": round(seconds, 2), "images": len(ds.db_paths) + len(ds.query_paths)}
    return q.vectors, db.vectors, settings


def _with_distractors(path: str, db: np.ndarray, q: np.ndarray, settings: dict) -> np.ndarray:
    """Database rows followed by the distractors' rows: ground-truth indices are unchanged and
    every distractor is a negative (the revisitop +1M setting). Needs N x D x 4 bytes of memory."""
    from ..descriptors import Descriptors

    dis = Descriptors.load(path, mmap=True)
    if dis.dim != db.shape[1]:
        raise CLIError(f"distractor descriptors are {dis.dim}-D, the database {db.shape[1]}-D")
    out = np.empty((db.shape[0] + len(dis), db.shape[1]), dtype=np.float32)
    out[: db.shape[0]] = db
    for start in range(0, len(dis), 65536):  # copied in blocks from the memory-mapped file
        out[db.shape[0] + start: db.shape[0] + start + 65536] = dis.vectors[start:start + 65536]
    settings["distractors"] = {"dir": str(path), "n": len(dis)}
    return out


def _fmt(v: float) -> str:
    return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.2f}"


def format_table(res: dict) -> str:
    kappas = res["kappas"]
    head = f"{'protocol':<9} {'mAP':>6}  " + "  ".join(f"{'mP@' + str(k):>6}" for k in kappas)
    lines = [head, "-" * len(head)]
    for proto, value in res["mAP"].items():
        mp = res["mP"][proto]
        lines.append(f"{PROTO_LABEL.get(proto, proto):<9} {_fmt(value)}  " + "  ".join(_fmt(mp[k]) for k in kappas))
    if "recall" in res:
        lines.append("recall@k  " + "  ".join(f"@{k}: {_fmt(v).strip()}" for k, v in res["recall"].items()))
    if "mAP@100" in res:
        lines.append(f"mAP@100   {_fmt(res['mAP@100'])}")
    return "\n".join(lines)


def plot_top10(path: str | Path, ds, scores: np.ndarray, max_queries: int = 20) -> int:
    """PNG grid: per query, the (cropped) query then its top-10 framed green (positive), red
    (negative) or grey (junk); revisitop datasets use the Medium protocol. Returns #queries drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluation import rank_from_scores, revisitop_protocols
    from ..extract import load_image
    from ..fileio import atomic_write_with

    gnd = revisitop_protocols(ds.gnd)["medium"] if ds.protocol == "revisitop" else ds.gnd
    nq = min(len(ds.query_ids), max_queries)
    ranks = rank_from_scores(scores[:nq], top_k=10)
    fig, axes = plt.subplots(nq, 11, figsize=(22, 2.2 * nq), squeeze=False)
    colours = {"positive": "#1a9641", "negative": "#d7191c", "junk": "#969696"}
    for i in range(nq):
        ok, junk = set(np.asarray(gnd[i]["ok"]).tolist()), set(np.asarray(gnd[i].get("junk", [])).tolist())
        ax = axes[i, 0]
        try:
            ax.imshow(_thumb(load_image(ds.query_paths[i], ds.query_bboxes[i])))
        except ValueError:
            pass
        ax.set_title(f"query {ds.query_ids[i]}"[:30], fontsize=7)
        _frame(ax, "#2b83ba")
        for r in range(10):
            ax = axes[i, r + 1]
            if r >= ranks.shape[1]:
                ax.axis("off")
                continue
            d = int(ranks[i, r])
            kind = "positive" if d in ok else "junk" if d in junk else "negative"
            try:
                ax.imshow(_thumb(load_image(ds.db_paths[d])))
            except ValueError:
                pass
            ax.set_title(f"{r + 1}. {kind}", fontsize=7, color=colours[kind])
            _frame(ax, colours[kind])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))
    plt.close(fig)
    return nq


def _thumb(im):
    im = im.copy()
    im.thumbnail((256, 256))
    return np.asarray(im)


def _frame(ax, colour: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(colour)
        s.set_linewidth(4)


def _jsonable(res: dict) -> dict:
    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, (np.floating, np.integer)):
            return fix(v.item())
        return v

    return fix(res)


def handler(args: argparse.Namespace) -> int:
    from ..fileio import atomic_write_json

    if args.images and args.features:
        raise CLIError("give either --images or --features, not both")
    if args.query_features and not args.features:
        raise CLIError("--query-features goes with --features")
    ds = load_benchmark(args)
    if args.features:
        q, db, settings = descriptors_from_features(args, ds)
    else:
        q, db, settings = descriptors_from_images(args, ds)
    if args.distractors:
        db = _with_distractors(args.distractors, db, q, settings)

    try:
        from ..rerank.options import rerank_from_args
    except ImportError:
        rerank_from_args = None
    if rerank_from_args is not None:
        scores, applied = rerank_from_args(args, q, db)
    else:  # re-ranking module not installed: plain cosine similarity
        from ..descriptors import l2_normalize

        scores, applied = l2_normalize(q) @ l2_normalize(db).T, {}
    res = ds.evaluate(scores, top_k=args.top_k)

    what = settings.get("model", "descriptors")
    if "pooling" in settings:
        what += f" {settings['pooling']}"
    if "imsize" in settings:
        what += f", {settings['imsize']} px, scales {','.join(f'{s:g}' for s in settings['scales'])}"
    extra = f" + {settings['distractors']['n']} distractors" if args.distractors else ""
    print(f"{ds.name}: {len(ds.db_ids)} database images{extra}, {len(ds.query_ids)} queries ({ds.protocol} protocol)")
    print(f"descriptors: {what}" + (f"; re-ranking: {', '.join(applied)}" if applied else ""))
    print(format_table(res))

    if args.json:
        record = _jsonable({**res, "dataset": ds.name, "protocol": ds.protocol, "n_db": len(ds.db_ids),
                            "n_queries": len(ds.query_ids), "settings": settings, "rerank": applied,
                            "ground_truth": ds.info})
        record["ground_truth"].pop("labels", None)
        atomic_write_json(args.json, record)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        n = plot_top10(args.plot, ds, scores, args.plot_queries)
        print(f"wrote {args.plot} ({n} queries)", file=sys.stderr)
    return 0
