"""``cbir search INDEX --image Q.jpg``: ranked results from a saved index.

Fast path: parsing imports neither torch nor timm, and on a CPU the query is described by the
index's network exported to ONNX (INDEX/query-model.npz, :mod:`cbir.index.onnx_query`), so a search
never imports torch; several ``--image`` (or a folder) are answered in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import CLIError
from .options import add_device_option

EPILOG = """\
examples:
  cbir search photos.index --image query.jpg
  cbir search photos.index --image a.jpg --image b.jpg   # several queries, one process (or --image FOLDER)
  cbir search photos.index --image query.jpg --bbox 120,40,880,700 --top 50 --json results.json
  cbir search photos.index --id 17                       # more like an indexed image (id number)
  cbir search photos.index --id paris_eiffel_000123     # ... or its name, as `cbir extract` names it
  cbir search photos.index --image query.jpg --qe 5 --alpha-qe 3 --diffusion
  cbir search big.index --image query.jpg --nprobe 64    # ivfpq: visit more lists
  cbir search photos.index --image query.jpg --verify 100  # verify the top 100 geometrically (SIFT + RANSAC)

--json FILE writes a list of {"id", "path", "score"[, "inliers"]}, best first ("-" = standard output); with
several queries, a list of {"query", "results"}.
The query is described by the index's network exported for ONNX Runtime (made by `cbir index
build`, or on the first search of an older index) unless --encoder torch or --device cuda.
Re-ranking runs on the index's stored descriptors: QE on the query's neighbours, --diffusion on
the kNN graph stored with the index (`cbir index build --graph K`; built for this call if absent),
truncated to the query's top --diffusion-trunc; --whiten and --dba transform every descriptor.
Spatial verification: an index built with --verify K (or given local features by `cbir index add
INDEX --verify K`) verifies each query's top K against its stored SIFT features by default; the
verified results come first and carry their inlier count ("inliers" in --json; -1: the query's
own photo); --verify 0 turns it off, --verify K changes K.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search an index with an image", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Find the indexed images most similar to a query image (or an indexed image).")
    p.add_argument("index", metavar="INDEX", help="index folder made by `cbir index build`")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", metavar="Q.jpg", action="append",
                   help="query image file, or a folder of them (repeat for several queries: one process)")
    q.add_argument("--id", metavar="ID|NAME", help="query with the descriptor of an indexed image: its id number, "
                                               "its path, or its `cbir extract` id (path without extension)")
    p.add_argument("--bbox", metavar="x1,y1,x2,y2", help="crop the query image to this box (original pixels)")
    p.add_argument("--top", type=int, default=20, help="number of results (default: 20)")
    p.add_argument("--json", metavar="FILE", help='write [{"id","path","score"}, ...] best first ("-" = stdout)')
    add_device_option(p)
    p.add_argument("--encoder", choices=("auto", "onnxruntime", "torch"), default="auto",
                   help="how the query is described: auto = the index's exported network by ONNX Runtime on "
                        "the CPU (no torch import), else torch (default: auto)")
    g = p.add_argument_group("approximate search (ivfpq / hnsw indexes)")
    g.add_argument("--nprobe", type=int, help="ivfpq: lists visited per query")
    g.add_argument("--refine", type=int, help="ivfpq: re-score refine*top candidates exactly (0 = off)")
    g.add_argument("--ef-search", type=int, dest="efSearch", help="hnsw: search beam width")
    from .rerank_options import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_search)


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    from ..extraction.images import parse_bbox as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None


def _check_index_path(path: Path) -> None:
    """Say what INDEX is when it is not an index (an extract folder, an image, nothing)."""
    if (path / "manifest.json").is_file():
        return
    if (path / "meta.json").is_file() and ((path / "descriptors.npy").is_file() or (path / "shards").is_dir()):
        raise CLIError(f"{path} holds descriptors from `cbir extract`, not an index; build one from it with "
                       f"`cbir index build --features {path} --out {path.name}.index`")
    if path.is_file():
        raise CLIError(f"{path} is a file, not an index folder (made by `cbir index build`)")
    if not path.exists():
        raise FileNotFoundError(f"index not found: {path} (make one with `cbir index build PHOTOS --out {path}`)")
    raise CLIError(f"{path} is not a cbir index (no manifest.json; make one with `cbir index build`)")


def wants_rerank(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "recipe", None) or getattr(args, "whiten", None) or getattr(args, "qe", 0) or getattr(args, "dba", 0)
                or getattr(args, "diffusion", False))


def query_images(values: list[str] | None) -> list[Path]:
    """The query files of ``--image`` (each a file, or a folder searched recursively for photos by the
    rule of :mod:`cbir.collection`)."""
    from ..collection import walk_folder

    out: list[Path] = []
    for v in values or []:
        p = Path(v)
        if p.is_dir():
            found, _ = walk_folder(p)
            if not found:
                raise CLIError(f"--image {p} is a folder without images")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"query image not found: {p}")
    return out


def cmd_search(args: argparse.Namespace) -> int:
    from ..index import Index
    from ..pipeline.searching import find_image, search_index
    from .rerank_options import settings_from_args

    if args.top < 1:
        raise CLIError("--top must be at least 1")
    bbox = parse_bbox(args.bbox)
    if bbox is not None and args.image is None:
        raise CLIError("--bbox applies to --image")
    rerank = settings_from_args(args, index=args.index)  # a Rerank, or the --recipe (or the index's)
    images = query_images(args.image)
    if bbox is not None and len(images) > 1:
        raise CLIError("--bbox applies to one query image; give one --image")
    _check_index_path(Path(args.index))
    from ..cache.digest import DigestMemo, default_cache_dir

    # memory-mapped vectors; each generation file's sha256 is checked once per file version (memoised)
    index = Index.load(args.index, device=args.device, mmap=True, digest=DigestMemo(default_cache_dir()).digest)
    if len(index) == 0:
        raise CLIError(f"the index {args.index} is empty")
    index.set_search_params(**{k: getattr(args, k) for k in ("nprobe", "refine", "efSearch")
                               if getattr(args, k) is not None and k in _search_keys(index.kind)})
    if args.image is None:
        queries = [(args.id, index.vector(find_image(index, args.id)))]
    else:
        queries = list(_describe(index, images, bbox, args))
    local = _local_features(args.index, rerank)
    results, failed = [], 0
    for name, q in queries:
        if isinstance(q, Exception):
            print(f"cbir search: {name}: {q}", file=sys.stderr)
            failed += 1
            continue
        verifier = None
        if local is not None:
            verifier = _query_verifier(local, name, args, bbox, index)
        hits, applied = search_index(index, q, args.top, rerank, verifier=verifier)
        results.append((name, hits, applied))
    _show(results, args, several=args.image is not None and len(images) > 1)
    return 2 if failed else 0


def _local_features(index_path: str, rerank):
    """The index's local features when the search verifies (None otherwise); CLIError in one line
    when verification is asked for and the index has none."""
    verify = getattr(rerank, "verify", None)
    if verify is None:
        return None
    from ..index.local import NO_LOCAL, LocalFeatures, has_local

    if not has_local(index_path):
        raise CLIError(NO_LOCAL(index_path, verify.k))
    return LocalFeatures(index_path)


def _query_verifier(local, name: str, args: argparse.Namespace, bbox, index):
    """The verifier of one query: an image (its SIFT extracted on first use, cropped to --bbox) or an
    indexed image (--id: its stored features)."""
    from ..index.local import index_verifier

    if args.image is None:
        from ..pipeline.searching import find_image

        return index_verifier(local, find_image(index, args.id), device=args.device)

    def extract():
        from ..local.features import extract_local

        return extract_local(name, local.settings, bbox, device="cpu" if args.device == "cpu" else "auto")

    return index_verifier(local, extract, device=args.device)


def _describe(index, images: list[Path], bbox, args: argparse.Namespace):
    """(name, descriptor or the ImageError) of each query image, described by one encoder."""
    from ..extraction.images import ImageError
    from ..index.embed import query_encoder

    photos = [r.path for r in index.records(limit=4) if Path(r.path).is_file()][:1]
    encoder = query_encoder(index.settings, args.index, device=args.device, encoder=args.encoder,
                            check_images=[images[0]] + photos,
                            log=lambda text: print(text, file=sys.stderr))
    for image in images:
        try:
            yield str(image), encoder.encode(image, bbox)
        except ImageError as exc:
            if len(images) == 1:
                raise
            yield str(image), exc


def _show(results: list, args: argparse.Namespace, several: bool) -> None:
    if several:
        record = [{"query": name, "results": [h.as_dict() for h in hits]} for name, hits, _ in results]
    else:
        record = [h.as_dict() for h in results[0][1]] if results else []
    if args.json == "-":
        print(json.dumps(record, indent=2))
    else:
        if args.json:
            from ..fileio import atomic_write_json

            atomic_write_json(args.json, record)
        for name, hits, applied in results:
            if several:
                print(f"query: {name}")
            if "verify" in applied:  # the inlier count of each verified-top-K result ("-": not among them)
                print(f"{'rank':>4}  {'score':>7}  {'inliers':>7}  {'id':>8}  path")
                for rank, h in enumerate(hits, 1):
                    n = "-" if h.inliers is None else ("itself" if h.inliers < 0 else str(h.inliers))
                    print(f"{rank:>4}  {h.score:7.4f}  {n:>7}  {h.id:>8}  {h.path}")
                continue
            print(f"{'rank':>4}  {'score':>7}  {'id':>8}  path")
            for rank, h in enumerate(hits, 1):
                print(f"{rank:>4}  {h.score:7.4f}  {h.id:>8}  {h.path}")
    applied = results[0][2] if results else {}
    if applied:
        print(f"re-ranking: {json.dumps(applied)}", file=sys.stderr)


def _search_keys(kind: str) -> tuple[str, ...]:
    from ..index.backends import SEARCH_TIME_PARAMS

    return SEARCH_TIME_PARAMS[kind]
