"""``cbir index build|add|remove|info``: a persistent, searchable index of a photo collection."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .extract import parse_scales

BUILD_EPILOG = """\
examples:
  cbir index build photos/ --out photos.index
  cbir index build photos/ --out photos.index --model resnet101 --pooling gem --imsize 1024 --scales 1,0.707,0.5
  cbir index build photos/ --out photos.index --model my_trained.pt          # a model saved by `cbir train`
  cbir index build photos/ --out big.index --type ivfpq --nlist 4096 --m 64 --nprobe 32
  cbir index build photos/ --out big.index --type hnsw --M 32 --ef-construction 200 --ef-search 128

index types: exact (default; matrix product, GPU fp16 when available; best up to ~1M images),
ivfpq (faiss IVF-PQ: compressed, needs >= max(nlist, 2^nbits) images to train), hnsw (faiss graph).
"""

ADD_EPILOG = """\
examples:
  cbir index add photos.index new/photo1.jpg new/photo2.jpg
  cbir index add photos.index more_photos/            # every image under the folder
  cbir index add photos.index edited.jpg --update     # re-describe an image that is already indexed
"""

REMOVE_EPILOG = """\
examples:
  cbir index remove photos.index 17 42
  cbir index info photos.index --list 10             # to see ids and paths
"""

INFO_EPILOG = """\
examples:
  cbir index info photos.index
  cbir index info photos.index --json --list 100
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build and maintain a persistent image index",
                       description="Build and maintain a persistent, searchable index of a photo collection.")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = isub.add_parser("build", help="index every image under a folder", epilog=BUILD_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Describe every image under FOLDER and save a new index at --out.")
    b.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively)")
    b.add_argument("--out", required=True, metavar="INDEX", help="index folder to write (replaced atomically if it exists)")
    b.add_argument("--model", default="efficientnet_lite0",
                   help="backbone name (timm/torchvision) or a model file saved by cbir (default: efficientnet_lite0)")
    b.add_argument("--pooling", default="gem", help="pooling for a backbone name (default: gem)")
    b.add_argument("--weights", default="default", help="backbone weights: default, none, or a file (default: default)")
    b.add_argument("--imsize", type=int, default=None,
                   help="longest image side before the network (default: the model's, see `cbir models`)")
    b.add_argument("--scales", default=None, help="comma-separated scales (default: the model's, e.g. 1,0.7071,0.5)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    b.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: 1 on CPU, 16 on GPU)")
    _add_type_args(b)
    b.set_defaults(func=cmd_build)

    a = isub.add_parser("add", help="add images (files or folders) to an index", epilog=ADD_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Describe images with the index's own model and settings and add them.")
    a.add_argument("index", metavar="INDEX")
    a.add_argument("paths", metavar="PATH", nargs="+", help="image files or folders")
    a.add_argument("--update", action="store_true", help="re-describe images already in the index (same id)")
    a.add_argument("--device", default="auto")
    a.set_defaults(func=cmd_add)

    r = isub.add_parser("remove", help="remove images by id", epilog=REMOVE_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("index", metavar="INDEX")
    r.add_argument("ids", metavar="ID", nargs="+", type=int)
    r.set_defaults(func=cmd_remove)

    i = isub.add_parser("info", help="show what an index holds", epilog=INFO_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("index", metavar="INDEX")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--list", type=int, default=0, metavar="N", help="also list the first N images (id, path)")
    i.set_defaults(func=cmd_info)


def _add_type_args(b: argparse.ArgumentParser) -> None:
    g = b.add_argument_group("search structure")
    g.add_argument("--type", choices=("exact", "ivfpq", "hnsw"), default="exact", help="default: exact")
    g.add_argument("--nlist", type=int, help="ivfpq: number of inverted lists (default 1024)")
    g.add_argument("--m", type=int, help="ivfpq: PQ sub-quantisers; must divide the dimension (default 64)")
    g.add_argument("--nbits", type=int, help="ivfpq: bits per sub-quantiser (default 8)")
    g.add_argument("--nprobe", type=int, help="ivfpq: lists visited per query (default 32)")
    g.add_argument("--refine", type=int, help="ivfpq: re-score refine*k candidates exactly, 0 = off (default 8)")
    g.add_argument("--M", type=int, dest="M", help="hnsw: links per node (default 32)")
    g.add_argument("--ef-construction", type=int, dest="efConstruction", help="hnsw: build beam (default 200)")
    g.add_argument("--ef-search", type=int, dest="efSearch", help="hnsw: search beam (default 128)")


def type_params(args: argparse.Namespace) -> dict:
    keys = {"ivfpq": ("nlist", "m", "nbits", "nprobe", "refine"), "hnsw": ("M", "efConstruction", "efSearch"), "exact": ()}
    given = {k: getattr(args, k) for k in ("nlist", "m", "nbits", "nprobe", "refine", "M", "efConstruction", "efSearch")
             if getattr(args, k, None) is not None}
    wrong = [k for k in given if k not in keys[args.type]]
    if wrong:
        from . import CLIError

        raise CLIError(f"--{wrong[0]} does not apply to --type {args.type}")
    return given


def _report_failed(failed: list[dict]) -> None:
    for f in failed[:20]:
        print(f"skipped {f['path']}: {f['reason']}", file=sys.stderr)
    if len(failed) > 20:
        print(f"... and {len(failed) - 20} more unreadable images", file=sys.stderr)


def cmd_build(args: argparse.Namespace) -> int:
    from ..index.build import IMAGE_SUFFIXES, build_index, list_images
    from . import CLIError

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    params = type_params(args)
    scales = parse_scales(args.scales) if args.scales else None  # None: the model's default
    files = list_images([folder])
    if not files:
        raise CLIError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    size = "the model's default size" if args.imsize is None else f"imsize {args.imsize}"
    scl = "scales" if scales is None else "scales " + ",".join(f"{s:g}" for s in scales)
    print(f"describing {len(files)} images with {args.model} ({size}, {scl}), then building the {args.type} index",
          file=sys.stderr)
    index, failed = build_index(files, model=args.model, pooling=args.pooling, weights=args.weights,
                                imsize="auto" if args.imsize is None else args.imsize, scales=scales,
                                kind=args.type, params=params,
                                device=args.device, batch_size=args.batch_size)
    _report_failed(failed)
    index.save(args.out)
    s = index.settings
    print(f"indexed {len(index)} images ({len(failed)} skipped; {s['model']} + {s['pooling']}, {index.dim}-d) -> {args.out}")
    return 0 if not failed else 1


def cmd_add(args: argparse.Namespace) -> int:
    from ..extract import extract
    from ..index import Index
    from ..index.build import list_images
    from ..index.embed import build_model_from_source

    index = Index.load(args.index, device=args.device)
    files = list_images(args.paths)
    known = {f: index.id_of_path(str(f)) for f in files}
    todo = [f for f in files if known[f] is None or args.update]
    already = [f for f in files if known[f] is not None and not args.update]
    for f in already:
        print(f"already indexed (id {known[f]}): {f}  (use --update to re-describe)", file=sys.stderr)
    if not todo:
        print("nothing to add")
        return 0
    settings = index.settings
    model = build_model_from_source(dict(settings.get("source") or {}))
    index.check_compatible(model.describe())
    res = extract(model, todo, imsize=settings.get("imsize"), scales=tuple(settings.get("scales") or (1.0,)),
                  device=args.device)
    _report_failed(res.failed)
    new_paths, new_vecs, updated = [], [], 0
    for row, i in enumerate(res.ok):
        f = todo[i]
        if known[f] is not None:
            index.update(known[f], res.vectors[row])
            updated += 1
        else:
            new_paths.append(str(f))
            new_vecs.append(res.vectors[row])
    if new_paths:
        import numpy as np

        index.add(np.stack(new_vecs), new_paths)
    index.save(args.index)
    print(f"added {len(new_paths)}, updated {updated}, skipped {len(res.failed)} unreadable; index has {len(index)} images")
    return 0 if not res.failed else 1


def cmd_remove(args: argparse.Namespace) -> int:
    from ..index import Index

    index = Index.load(args.index, device="cpu")
    index.remove(args.ids)
    index.save(args.index)
    print(f"removed {len(set(args.ids))}; index has {len(index)} images")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..index import Index

    index = Index.load(args.index, device="cpu")
    info = index.info()
    info["path"] = str(Path(args.index).resolve())
    if args.list:
        info["images"] = [r.as_dict() for r in index.records(limit=args.list)]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    s = info["settings"]
    print(f"index     {info['path']}")
    print(f"images    {info['count']}")
    print(f"type      {info['type']} {json.dumps(info['params']) if info['params'] else ''}")
    print(f"model     {s.get('model')} + {s.get('pooling')}  whitening={s.get('whitening')}  dim={info['dim']}")
    print(f"extract   imsize={s.get('imsize')} scales={s.get('scales')}")
    for r in info.get("images", []):
        print(f"{r['id']:>8}  {r['path']}")
    return 0
