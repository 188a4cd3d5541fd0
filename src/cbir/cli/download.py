"""``cbir download``: fetch benchmarks from their official sites (resumable, checksummed, atomic).

    cbir download roxford5k rparis6k --data-root data/     # revisitop gnd .pkl + Oxford/Paris images
    cbir download roxford5k --data-root data/ --no-images  # only the ground truth (~150 KB)
    cbir download revisitop1m --data-root data/            # 1M distractors: list + 100 archives
Then: cbir evaluate --dataset roxford5k --data-root data/
"""

from __future__ import annotations

import argparse
import sys

from . import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    from ..datasets.download import DOWNLOADABLE

    p = sub.add_parser("download", help="download a benchmark (roxford5k, rparis6k, revisitop1m, ...)",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", metavar="NAME", help=", ".join(DOWNLOADABLE))
    p.add_argument("--data-root", required=True, metavar="DIR", help="files go to DIR/datasets/NAME/")
    p.add_argument("--no-images", action="store_true", help="only ground truth / lists, no image archives")
    p.add_argument("--keep-archives", action="store_true", help="keep the .tgz/.tar files after unpacking")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default 30)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..datasets.download import DOWNLOADABLE, DownloadError, fetch

    unknown = [n for n in args.names if n not in DOWNLOADABLE]
    if unknown:
        raise CLIError(f"unknown dataset {unknown[0]!r}; downloadable: {', '.join(DOWNLOADABLE)}")
    state = {"url": None}

    def progress(url: str, done: int, total: int | None) -> None:
        if args.quiet:
            return
        if url != state["url"]:
            if state["url"] is not None:
                print(file=sys.stderr)
            state["url"] = url
        size = f"/{total / 1e6:.1f}" if total else ""
        print(f"\r{url}: {done / 1e6:.1f}{size} MB", end="", file=sys.stderr, flush=True)

    for name in args.names:
        try:
            folder = fetch(name, args.data_root, with_images=not args.no_images, keep_archives=args.keep_archives,
                           timeout=args.timeout, progress=progress)
        except DownloadError as exc:
            if state["url"] is not None:
                print(file=sys.stderr)
            raise CLIError(str(exc)) from exc
        if state["url"] is not None:
            print(file=sys.stderr)
            state["url"] = None
        print(f"{name}: ready in {folder}")
    return 0
