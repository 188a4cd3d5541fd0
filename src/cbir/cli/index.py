"""``cbir index build|add|remove|info``: a persistent, searchable index of a photo collection."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import CLIError
from .options import add_device_option, add_extraction_options, add_model_options, extraction, model_spec

BUILD_EPILOG = """\
examples:
  cbir index build photos/ --out photos.index
  cbir index build photos/ --out photos.index --model resnet101 --pooling gem --imsize 1024 --scales 1,0.707,0.5
  cbir index build photos/ --out photos.index --model my_trained.pt          # a model saved by `cbir train`
  cbir index build photos/ --out big.index --type ivfpq --nlist 4096 --m 64 --nprobe 32
  cbir index build photos/ --out big.index --type hnsw --M 32 --ef-construction 200 --ef-search 128
  cbir index build photos/ --out big.index --type faiss --factory "IVF4096_HNSW32,PQ64x4fs,RFlat" --recall-target 0.95
  cbir index build --features feats/ --out photos.index   # descriptors of `cbir extract photos/ --out feats/`
  cbir index build photos/ --out photos.index --verify 100  # + local features: searches verify their top 100

index types: exact (default; matrix product, GPU fp16 when available; best up to ~1M images),
ivfpq (faiss IVF-PQ: compressed, needs >= max(nlist, 2^nbits) images to train), hnsw (faiss graph),
faiss (any faiss index_factory string; its search parameters are chosen automatically for
--recall-target on held-out queries, see docs/search.md).
"""

ADD_EPILOG = """\
examples:
  cbir index add photos.index new/photo1.jpg new/photo2.jpg
  cbir index add photos.index more_photos/            # every image under the folder
  cbir index add photos.index edited.jpg --update     # re-describe an image that is already indexed
  cbir index add photos.index --features new_feats/   # descriptors from `cbir extract` (same model)
  cbir index add photos.index --verify 100            # give an index local features (spatial verification)

An index with local features (built or given them with --verify K) keeps them current: added
images are described by SIFT too, re-described ones (--update) again, removed ones removed.
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

    b = isub.add_parser("build", help="index every image under a folder (or an extract folder)", epilog=BUILD_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Describe every image under FOLDER (or take the descriptors of a `cbir extract` "
                                    "folder with --features) and save a new index at --out.")
    b.add_argument("folder", metavar="FOLDER", nargs="?", help="folder of images (searched recursively)")
    b.add_argument("--features", metavar="DIR", help="build from the descriptors of `cbir extract ... --out DIR` "
                                                     "(nothing is described again; model options are not needed)")
    b.add_argument("--out", required=True, metavar="INDEX",
                   help="index folder to write (a new path, or an existing index, replaced atomically; its ids continue, none is reused)")
    g = b.add_argument_group("model and extraction (with FOLDER)")
    add_model_options(g)
    add_extraction_options(g)
    _add_type_args(b)
    b.add_argument("--recipe", metavar="FILE",
                   help="a `cbir tune` recipe kept with the index (INDEX/recipe.json): `cbir search` and "
                        "`cbir serve` re-rank with it unless told otherwise")
    b.add_argument("--no-cache", action="store_true",
                   help="describe every image again and keep nothing in the extraction cache ($CBIR_CACHE)")
    _add_local_args(b)
    b.set_defaults(func=cmd_build)

    a = isub.add_parser("add", help="add images (files or folders) to an index", epilog=ADD_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Describe images with the index's own model and settings and add them "
                                    "(or add the descriptors of a `cbir extract` folder with --features).")
    a.add_argument("index", metavar="INDEX")
    a.add_argument("paths", metavar="PATH", nargs="*", help="image files or folders")
    a.add_argument("--features", metavar="DIR", help="add the descriptors of a `cbir extract` folder (made with the "
                                                     "index's model and settings) instead of describing images")
    a.add_argument("--update", action="store_true", help="re-describe images already in the index (same path)")
    add_device_option(a)
    a.add_argument("--no-cache", action="store_true",
                   help="describe every image again and keep nothing in the extraction cache ($CBIR_CACHE)")
    _add_local_args(a)
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


def _add_local_args(p: argparse.ArgumentParser) -> None:
    """--verify K and its rules (kept with the index in INDEX/verify.json), --local-workers."""
    from .rerank_options import add_verify_arguments

    add_verify_arguments(p)
    p.add_argument("--local-workers", type=int, default=1, metavar="N",
                   help="processes extracting the local features (SIFT) of the images (default 1)")


def _local_setting(args: argparse.Namespace):
    """(given, VerifyParams or None) of --verify*; --local-workers checked."""
    from .rerank_options import verify_of_args

    if args.local_workers < 1:
        raise CLIError("--local-workers must be at least 1")
    return verify_of_args(args)


def _sync_local(path, index, args: argparse.Namespace, *, refresh=(), verify=None) -> None:
    """Bring INDEX/local in step with the index (extract new / re-described images, drop removed ones)
    and keep ``verify`` (when given) as the index's verification; one line to stderr."""
    from ..index.local import save_verify, sync_local

    res = sync_local(path, index, refresh=refresh, progress=True, workers=getattr(args, "local_workers", 1),
                     device=getattr(args, "device", "auto") if getattr(args, "device", "auto") in ("cpu", "cuda") else "auto")
    if verify is not None:
        save_verify(path, verify)
    bad = res["unreadable"]
    print(f"local features ({res['settings']}): {res['extracted']} images described, {res['removed']} removed, "
          f"{res['images']} stored" + (f", {len(bad)} unreadable" if bad else "")
          + (f"; searches verify the top {verify.k} by default (--verify 0: off)" if verify is not None else ""),
          file=sys.stderr)


def _add_type_args(b: argparse.ArgumentParser) -> None:
    g = b.add_argument_group("search structure")
    g.add_argument("--type", choices=("exact", "ivfpq", "hnsw", "faiss"), default="exact", help="default: exact")
    g.add_argument("--graph", type=int, default=None, metavar="K",
                   help="store the kNN graph (K neighbours per image) for `cbir search --diffusion`; kept current by "
                        "add/remove; 0 = none (default: the diffusion default k)")
    g.add_argument("--factory", help='faiss: index_factory string, e.g. "IVF4096_HNSW32,PQ64x4fs,RFlat"')
    g.add_argument("--recall-target", type=float, dest="recall_target",
                   help="faiss: choose nprobe/efSearch/k_factor for this recall@100, measured with up to 1000 indexed "
                        "images as queries (default 0.95)")
    g.add_argument("--nlist", type=int, help="ivfpq: number of inverted lists (default 1024)")
    g.add_argument("--m", type=int, help="ivfpq: PQ sub-quantisers; must divide the dimension (default 64)")
    g.add_argument("--nbits", type=int, help="ivfpq: bits per sub-quantiser (default 8)")
    g.add_argument("--nprobe", type=int, help="ivfpq: lists visited per query (default 32)")
    g.add_argument("--refine", type=int, help="ivfpq: re-score refine*k candidates exactly, 0 = off (default 8)")
    g.add_argument("--M", type=int, dest="M", help="hnsw: links per node (default 32)")
    g.add_argument("--ef-construction", type=int, dest="efConstruction", help="hnsw: build beam (default 200)")
    g.add_argument("--ef-search", type=int, dest="efSearch", help="hnsw: search beam (default 128)")


def type_params(args: argparse.Namespace) -> dict:
    keys = {"ivfpq": ("nlist", "m", "nbits", "nprobe", "refine"), "hnsw": ("M", "efConstruction", "efSearch"), "exact": (),
            "faiss": ("factory", "recall_target")}
    given = {k: getattr(args, k) for k in ("nlist", "m", "nbits", "nprobe", "refine", "M", "efConstruction", "efSearch",
                                            "factory", "recall_target")
             if getattr(args, k, None) is not None}
    wrong = [k for k in given if k not in keys[args.type]]
    if wrong:
        raise CLIError(f"--{wrong[0].replace('_', '-')} does not apply to --type {args.type}")
    if getattr(args, "graph", None) is not None and args.graph < 0:
        raise CLIError("--graph must be >= 0")
    given.pop("recall_target", None)
    return given


def _report_failed(failed: list[dict]) -> None:
    for f in failed[:20]:
        print(f"skipped {f['path']}: {f['reason']}", file=sys.stderr)
    if len(failed) > 20:
        print(f"... and {len(failed) - 20} more unreadable images", file=sys.stderr)


def check_output(out: str | Path) -> None:
    """Fail before any work when --out cannot become an index: an existing file, or a non-empty
    folder that is not an index (an existing index is replaced atomically)."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise CLIError(f"--out {out} is a folder that is not a cbir index; give a new path or an existing index")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is an existing file, not an index folder; give a new path or an existing index")
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise CLIError(f"--out {out}: {blocked} is a file, so the index folder cannot be made there")


def _finish_and_save(index, args: argparse.Namespace) -> None:
    """The kNN graph (--graph), the faiss tuning (--recall-target), then a save under the writer lock
    (refused when the index being replaced gave ids past ``args.first_id`` meanwhile)."""
    from ..index import next_free_id, writer_lock

    if args.graph != 0:
        index.build_graph(args.graph)
    if index.kind == "faiss":
        target = args.recall_target if args.recall_target is not None else 0.95
        tuned = index.tune_on_sample(target=target)
        print(f"search parameters {tuned.search}: recall@{tuned.k} {tuned.recall:.3f} with {tuned.queries} indexed "
              f"images as queries (target {target})" + ("" if tuned.reached else " -- TARGET NOT REACHED"), file=sys.stderr)
    with writer_lock(args.out).acquire(timeout=600):  # no other writer between our save and theirs
        if next_free_id(args.out) > args.first_id:
            raise CLIError(f"{args.out} was changed by another writer while this build ran (its ids went past "
                           f"{args.first_id}); nothing was saved: run the build again")
        index.save(args.out)


def keep_recipe(args: argparse.Namespace) -> None:
    """``--recipe FILE``: a copy in the index folder (INDEX/recipe.json), used by search and serve."""
    if getattr(args, "recipe", None):
        from ..rerank.recipe import INDEX_RECIPE, Recipe

        Recipe.load(args.recipe).save(Path(args.out) / INDEX_RECIPE)


def _cache_dir(args: argparse.Namespace):
    """The extraction cache folder, or None with --no-cache."""
    from ..cache.digest import default_cache_dir

    return None if getattr(args, "no_cache", False) else default_cache_dir()


def _export_query_model(index, args: argparse.Namespace) -> None:
    """The index's network exported for torch-free `cbir search` (INDEX/query-model.npz), checked on
    up to 2 indexed photos; one line to stderr."""
    from ..index.embed import export_for_index

    photos = [r.path for r in index.records(limit=8) if Path(r.path).is_file()][:2]
    try:
        what = export_for_index(args.out, index.settings, photos)
    except Exception as exc:  # an optional speed-up: the index is saved and works without it
        what = f"not exported ({type(exc).__name__}: {exc})"
    print(f"query network for fast search: {what}", file=sys.stderr)


def cmd_build(args: argparse.Namespace) -> int:
    from ..fileio import FormatError
    from ..index import next_free_id
    from ..collection import list_photos
    from ..index.build import IMAGE_SUFFIXES, build_index, index_from_descriptors

    if (args.folder is None) == (args.features is None):
        raise CLIError("give a FOLDER of images or --features DIR (a `cbir extract` output), one of them")
    params = type_params(args)
    check_output(args.out)
    try:  # a rebuild replacing an index continues its ids: none is reused
        args.first_id = next_free_id(args.out)
    except FormatError as exc:
        raise CLIError(f"--out {args.out} is a damaged index ({exc}); its ids are unknown, so a rebuild could "
                       f"reuse them: delete it or give a new path") from exc
    _, verify = _local_setting(args)
    needs_local = verify is not None
    if args.recipe:
        from ..rerank.recipe import Recipe

        needs_local |= Recipe.load(args.recipe).verify is not None  # a bad recipe fails before any work
    if args.features:
        index = index_from_descriptors(args.features, kind=args.type, params=params, device=args.device,
                                       first_id=args.first_id)
        _finish_and_save(index, args)
        keep_recipe(args)
        _keep_local(index, args, needs_local, verify)
        _export_query_model(index, args)
        s = index.settings
        print(f"indexed {len(index)} images from {args.features} ({s.get('model')} + {s.get('pooling')}, "
              f"{index.dim}-d, nothing described) -> {args.out}")
        return 0
    folder = Path(args.folder)
    if folder.is_file():
        raise CLIError(f"{folder} is a file: give the folder of images (or `cbir index add INDEX {folder}`)")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    spec = model_spec(args)
    imsize, scales = extraction(args)
    found = list_photos([folder], exclude=args.out)  # the photo rule of cbir.collection, as `cbir extract`
    if found.not_images:
        print(found.skipped_line(), file=sys.stderr)
    files = [f.resolve() for f in found.files]
    if not files:
        raise CLIError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    print(f"describing {len(files)} images with {args.model} (imsize {imsize}, "
          f"scales {','.join(f'{s:g}' for s in scales)}), then building the {args.type} index", file=sys.stderr)
    from ..cache.describe import CacheStats

    stats = CacheStats()
    index, failed = build_index(files, model=spec.model, pooling=spec.pooling, weights=spec.weights,
                                imsize=imsize, scales=scales, kind=args.type, params=params,
                                device=args.device, batch_size=args.batch_size, precision=args.precision,
                                first_id=args.first_id, cache_dir=_cache_dir(args), stats=stats)
    if stats.hits:
        print(f"descriptors: {stats.described} images described, {stats.hits} read from the extraction cache",
              file=sys.stderr)
    _report_failed(failed)
    _finish_and_save(index, args)
    keep_recipe(args)
    _keep_local(index, args, needs_local, verify)
    _export_query_model(index, args)
    s = index.settings
    print(f"indexed {len(index)} images ({len(failed)} skipped as unreadable; {s['model']} + {s['pooling']}, "
          f"{index.dim}-d) -> {args.out}")
    return 0


def _keep_local(index, args: argparse.Namespace, needs_local: bool, verify) -> None:
    """After a build: the local features of every image (with --verify K or a recipe that verifies),
    else none (those of an index this build replaced are dropped with its verification setting)."""
    from ..index.local import drop_local

    drop_local(args.out)  # a replaced index's features name ids this build does not have
    if needs_local:
        _sync_local(args.out, index, args, verify=verify)


def cmd_add(args: argparse.Namespace) -> int:
    from ..index import Index, open_for_write
    from ..index.build import add_or_update, descriptors_of_paths, plan_add
    from ..index.embed import describe_for_index
    from ..index.local import drop_local, has_local

    given, verify = _local_setting(args)
    if args.paths and args.features:
        raise CLIError("give image files/folders or --features DIR (a `cbir extract` output), one of them")
    if not args.paths and not args.features:
        if not given:
            raise CLIError("give image files/folders or --features DIR (a `cbir extract` output), one of them "
                           "(or --verify K alone: give the index local features)")
        if not (Path(args.index) / "manifest.json").is_file():
            raise FileNotFoundError(f"index not found: {args.index}")
        if verify is None:
            drop_local(args.index)
            print(f"{args.index}: local features and the verification setting removed")
            return 0
        _sync_local(args.index, Index.load(args.index, device="cpu", mmap=True), args, verify=verify)
        return 0
    snapshot = Index.load(args.index, device=args.device)  # to plan and describe (outside the writer lock)
    cache = _cache_dir(args)
    from ..cache.digest import DigestMemo

    memo = DigestMemo(cache).digest  # file hashes remembered (None: this run only)
    failed: list[dict] = []
    if args.features:
        paths, vectors, meta = descriptors_of_paths(args.features)
        snapshot.check_compatible(meta)
        plan = plan_add(snapshot, paths, update=args.update, digest=memo)
        row = {p: i for i, p in enumerate(paths)}
        vectors = vectors[[row[p] for p in plan.todo]] if plan.todo else vectors[:0]
    else:
        from ..collection import list_photos

        found = list_photos(args.paths)  # the photo rule of cbir.collection, as `index build` and `extract`
        if found.not_images:
            print(found.skipped_line(), file=sys.stderr)
        plan = plan_add(snapshot, [f.resolve() for f in found.files], update=args.update, digest=memo)
    todo, already = plan.todo, plan.already
    for f, first in plan.repeats.items():
        print(f"duplicate (named more than once, added once): {f}" if f == first
              else f"duplicate of {first} (same bytes, added once): {f}", file=sys.stderr)
    for f, i in plan.copies.items():
        print(f"duplicate of id {i} (same bytes as {snapshot.get(i).path}): {f}", file=sys.stderr)
    for f, i in already.items():
        print(f"already indexed (id {i}): {f}  (use --update to re-describe)", file=sys.stderr)
    n_dup = len(plan.repeats) + len(plan.copies)
    if not todo:
        print(f"nothing to add ({len(already)} already indexed, {n_dup} duplicates)")
        return 0
    if not args.features:
        res, about = describe_for_index(snapshot.settings, todo, device=args.device, cache_dir=cache)
        snapshot.check_compatible(about)
        failed = res.failed
        _report_failed(failed)
        todo, vectors = [todo[i] for i in res.ok], res.vectors
    settings = dict(snapshot.settings)
    del snapshot
    with open_for_write(args.index, device=args.device) as index:  # the newest generation, locked
        index.check_compatible(settings)
        updated = [i for i in (index.id_of_path(str(p)) for p in todo) if i is not None] if args.update else []
        counts = add_or_update(index, todo, vectors, update=args.update)  # re-checks paths added meanwhile
        n = len(index)
    raced = f", {counts['present']} added meanwhile by another writer" if counts["present"] else ""
    print(f"added {counts['added']}, updated {counts['updated']}, skipped {len(failed)} unreadable, "
          f"{len(already)} already indexed, {n_dup} duplicates{raced}; index has {n} images")
    if given and verify is None:
        drop_local(args.index)
    elif verify is not None or has_local(args.index):
        _sync_local(args.index, index, args, refresh=updated, verify=verify)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from ..index import open_for_write

    from ..index.local import has_local

    with open_for_write(args.index, device="cpu") as index:
        index.remove(args.ids)
    print(f"removed {len(set(args.ids))}; index has {len(index)} images")
    if has_local(args.index):
        _sync_local(args.index, index, args)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..index import Index

    index = Index.load(args.index, device="cpu")
    info = index.info()
    info["path"] = str(Path(args.index).resolve())
    from ..index.local import has_local, load_verify

    if has_local(args.index):
        from ..index.local import LocalFeatures

        store = LocalFeatures(args.index).store()
        verify = load_verify(args.index)
        info["local"] = {"images": len(store), "settings": store.settings.key(),
                         "verify": None if verify is None else verify.to_dict()}
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
    if info.get("local"):
        loc = info["local"]
        verify = f"verify top {loc['verify']['k']} by default" if loc.get("verify") else "no default verification"
        print(f"local     {loc['images']} images, {loc['settings']}; {verify}")
    for r in info.get("images", []):
        print(f"{r['id']:>8}  {r['path']}")
    return 0
