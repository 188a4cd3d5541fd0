"""``cbir extract``: one L2-normalised descriptor per image, saved as a sharded store DIR/shards/ + DIR/meta.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import CLIError
from .options import add_backend_option, add_extraction_options, add_model_options, extraction, model_spec

EPILOG = """\
examples:
  cbir extract photos/ --out feats/                         # Lite0 + GeM at its default 512 px, 3 scales (offline)
  cbir extract a.jpg b.jpg --out feats/ --imsize 512 --scales 1
  cbir extract photos/ --out feats/ --model resnet101 --pooling gem:p=3 --device cuda
  cbir extract photos/ --out feats/ --model resnet50 --weights resnet50.pth   # offline: a local state dict
  cbir extract photos/ --out feats/ --model my_trained.pt   # a model saved by `cbir train`
  cbir extract photos/ --out feats/ --pooling rmac:levels=3
  cbir extract photos/ --out feats/ --model gl18-tl-resnet101-gem-w      # a published network (`cbir models`)
  cbir extract photos/ --out feats/ --model gl18-tl-resnet101-gem-w-a4d43db.pth   # ... from its file
  cbir extract photos/ --out feats/ --pooling bow:k=1024 --codebook cb.npz    # fits cb.npz if it is missing
  cbir extract photos/ --out feats/ --dtype float16 --strict
  cbir extract photos/ --out feats/ --engine ray                # local Ray: decode tasks + a pool of model actors
  cbir extract photos/ --out feats/ --engine ray --address auto # a running Ray cluster (`ray start --head`)
  cbir extract photos/ --out feats/ --backend torch --precision bf16   # eager torch (bf16 on AMX CPUs)

ids: the path relative to the given folder, without its extension (photos/a/b.jpg -> "a/b");
a file given by name gets its bare name. Unreadable files (corrupt, truncated, empty, not an
image) are listed with the reason in DIR/meta.json "failed" and the run goes on (--strict: stop).
Output: DIR/shards/*.npy + *.json (one shard per --chunk inputs, written as it goes) and DIR/meta.json
(last). Interrupted? Run the same command again (either engine): finished shards are kept and it
resumes ("resuming at N of M images" on stderr). --engine ray: a lost node's work is done again by Ray
(actor restarts, task retries), else the missing shards are submitted again (docs/extraction.md).
Odd shapes are fine: every scale's sides are kept >= 32 px (a 1x1 image, a 3000x2 strip, a crop 1 px
high are described); only a crop with no pixel inside its image is reported as failed.
Poolings: spoc, mac, gem, rmac, regional, crow, bow (`cbir models` lists them with parameters).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="describe images: one L2-normalised vector per image",
        description="Describe every image (files, or folders searched recursively) with a CNN/ViT backbone and a "
                    "global pooling; write a sharded store DIR/shards/ (N x D in all) and DIR/meta.json "
                    "(settings, failures), read by every other command.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", metavar="PATH", nargs="+", help="image files and/or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (rerun the same command to resume)")
    g = p.add_argument_group("model")
    add_model_options(g)
    g.add_argument("--codebook", metavar="FILE", help="bow: codebook .npz to use; fitted on the images and saved "
                                                      "here when missing (default: DIR/codebook.npz)")
    e = p.add_argument_group("extraction")
    add_extraction_options(e)
    e.add_argument("--workers", type=int, default=None, help="image-decoding processes (default: 0 on a 2-core CPU, "
                                                            "up to 8 with a GPU)")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored precision (default: float32)")
    e.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    e.add_argument("--no-cache", action="store_true",
                   help="describe every image again and keep nothing in the extraction cache ($CBIR_CACHE)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--chunk", type=int, default=64, metavar="N",
                   help="inputs per shard of the store, also the resume step (default: 64)")
    add_backend_option(e)
    e.add_argument("--decode", choices=("auto", "cpu", "cuda"), default="auto",
                   help="JPEG decoding: auto = on the GPU (nvjpeg) when --device is CUDA, else PIL (default: auto)")
    r = p.add_argument_group("distributed")
    r.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process; ray: Ray Data (decode tasks, an actor pool of models, GPU actors when "
                        "the cluster has GPUs), same shards (default: local)")
    r.add_argument("--address", default=None, metavar="ADDR",
                   help="--engine ray: a running cluster (auto, HOST:6379, ray://HOST:10001); default: a local Ray")
    r.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="--engine ray: model actors (default: the cluster's GPUs, else its CPUs)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..collection import collect_images, ensure_codebook
    from ..extract import extract_to_dir
    from ..index.embed import source_of

    spec = model_spec(args)
    extraction(args)  # bad --imsize/--scales fail before any work
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder (new, or one written by `cbir extract` to resume)")
    found = collect_images(args.paths, exclude=out)
    if found.not_images:
        print(found.skipped_line(), file=sys.stderr)
    ids, files = found.ids, found.files
    model = spec.build()
    imsize, scales = extraction(args, model=model)  # not given: the model's own default (`cbir models`)
    extra: dict = {"source": source_of(spec, model), "paths": {i: str(f.resolve()) for i, f in zip(ids, files)}}
    if model.pooling.name == "bow" and not bool(model.pooling.fitted):
        cb_path = Path(args.codebook) if args.codebook else out / "codebook.npz"
        if not cb_path.is_file():
            print(f"fitting a {model.pooling.k}-word BoW codebook on up to 200 of the images ...", file=sys.stderr)
        if ensure_codebook(model, files, cb_path, imsize=imsize, device=args.device):
            print(f"codebook saved to {cb_path}", file=sys.stderr)
        extra["codebook"] = str(cb_path)
    if args.engine == "ray" and (args.backend not in ("auto", "torch") or args.decode == "cuda"):
        raise CLIError("--engine ray uses --backend torch and PIL decoding")
    if args.engine == "ray" and args.workers:
        raise CLIError("--workers (decoding processes) is for --engine local; Ray decodes in its own tasks "
                       "(--ray-workers sets the model actors)")
    planned: list = []

    def on_plan(job) -> None:
        planned.append(job)
        kept = len(job.paths) - job.inputs_of(job.pending()) if not job.complete else len(job.paths)
        if not job.complete and kept:
            print(f"resuming at {kept} of {len(job.paths)} images ({out} holds the finished shards of an "
                  f"interrupted run)", file=sys.stderr)

    local: dict = {}
    if args.engine != "ray":
        local = dict(workers=args.workers, backend=args.backend, decode=args.decode)
        if not args.no_cache and model.pooling.name != "bow":
            from ..cache.describe import DescriptorCache

            local["cache"] = DescriptorCache.for_spec(spec, imsize=imsize, scales=scales, device=args.device,
                                                      precision=args.precision, backend=args.backend,
                                                      decode=args.decode)
    desc = extract_to_dir(
        model, files, out, ids=ids, imsize=imsize, scales=scales, dtype=args.dtype, chunk=args.chunk,
        batch_size=args.batch_size, device=args.device, strict=args.strict, precision=args.precision,
        progress=not args.quiet, extra_meta=extra, engine=args.engine, address=args.address,
        ray_workers=args.ray_workers, on_plan=on_plan, **local,
    )
    for f in desc.failed:
        print(f"failed: {f['path']}: {f['reason']}", file=sys.stderr)
    if planned and planned[0].complete:
        print(f"{out} was already complete: {len(desc)} images ({desc.dim}-D {desc.vectors.dtype}), "
              f"{len(desc.failed)} failed; nothing described")
        return 0
    print(f"{len(desc)} images described ({desc.dim}-D {desc.vectors.dtype}), {len(desc.failed)} failed -> {out}")
    return 0
