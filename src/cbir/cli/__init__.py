"""``cbir`` command line: one thin sub-command per stage.

Each stage lives in ``cbir/cli/<stage>.py`` and exposes ``register(subparsers)``, which adds its
parser(s) with ``set_defaults(func=handler)``. A handler parses nothing itself, calls the library,
prints, and returns an exit code. Heavy imports (torch, faiss) happen inside handlers so that
``cbir --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Order here is the order in `cbir --help`.
STAGES = ("extract", "models", "whiten", "tune", "evaluate", "download", "index", "search", "serve", "train")

EPILOG = """\
typical flow:
  cbir extract photos/ --out feats/            # one L2-normalised descriptor per image
  cbir index build photos/ --out my.index      # a persistent, searchable index
  cbir search my.index --image query.jpg       # ranked results
  cbir evaluate --dataset demo                 # mAP on the bundled demo benchmark
Run `cbir COMMAND --help` for each command's options.
"""


class CLIError(Exception):
    """An error to report to the user as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbir",
        description="Deep-learning instance image retrieval: find the other photos of the same place or object.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"cbir {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in STAGES:
        try:
            module = importlib.import_module(f"{__name__}.{stage}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{stage}":
                continue  # stage not built (yet)
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..fileio import FormatError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CLIError, FileNotFoundError, FormatError, ValueError, KeyError, PermissionError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"cbir {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
